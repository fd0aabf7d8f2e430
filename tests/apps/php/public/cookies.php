<?php
// Two cookies: two Set-Cookie header fields, never to be joined.
setcookie("first", "1", ["path" => "/"]);
setcookie("second", "2", ["path" => "/", "httponly" => true]);
echo "two cookies\n";
