<?php
// Deploy step of __project__: corral runs it once each time it starts, before
// the first request (output in log/deploy.log).  Put here what a new version
// needs before it serves: `composer install`, database migrations, ...
// data/ is for files the site writes (outside the document root, never served).
$data = __DIR__ . '/data';
if (!is_dir($data) && !mkdir($data, 0775)) {
    file_put_contents("php://stderr", "deploy: cannot create $data\n");
    exit(1);
}
echo "deploy: PHP " . PHP_VERSION . ", $data is ready\n";
echo "deploy: done\n";
