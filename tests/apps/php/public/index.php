<?php
// The front controller: what PHP was told about the request, as JSON.
header("Content-Type: application/json");
echo json_encode([
    "get" => $_GET,
    "script_name" => $_SERVER["SCRIPT_NAME"],
    "script_filename" => $_SERVER["SCRIPT_FILENAME"],
    "document_root" => $_SERVER["DOCUMENT_ROOT"],
    "path_info" => $_SERVER["PATH_INFO"] ?? "",
    "request_uri" => $_SERVER["REQUEST_URI"],
    "method" => $_SERVER["REQUEST_METHOD"],
    "pid" => getmypid(),
]);
