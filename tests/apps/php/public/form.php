<?php
// Echoes the fields of a posted form, as PHP parsed them.
header("Content-Type: application/json");
echo json_encode(["method" => $_SERVER["REQUEST_METHOD"],
                  "content_type" => $_SERVER["CONTENT_TYPE"] ?? "",
                  "post" => $_POST]);
