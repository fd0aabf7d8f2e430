<?php
// A folder's own index, for the URL /sub/.
echo "sub index ", $_SERVER["SCRIPT_NAME"], "\n";
