<?php
// A large response made by PHP: ?mb=N megabytes of a numbered pattern, so a
// lost or repeated piece shows.
$mb = (int)($_GET["mb"] ?? 5);
header("Content-Type: application/octet-stream");
for ($i = 0; $i < $mb * 1024; $i++) {
    echo str_pad(sprintf("%08d", $i), 1024, ".");
}
