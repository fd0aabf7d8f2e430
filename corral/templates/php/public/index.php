<?php
// The front controller of __project__: corral's front sends every request
// path that names no other script here, with the path in PATH_INFO (empty
// for the site's own URL, /).
$path = ($_SERVER['PATH_INFO'] ?? '') ?: '/';
if ($path !== '/') {
    http_response_code(404);
}
?><!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>__project__</title>
  <link rel="stylesheet" href="/assets/site.css">
</head>
<body>
  <main>
<?php if ($path === '/'): ?>
    <h1>__project__ works</h1>
    <p>This PHP <?= htmlspecialchars(PHP_VERSION) ?> site is served by corral through php-cgi.</p>
    <p>Edit <code>public/index.php</code>; php-cgi reads it again on each request.</p>
<?php else: ?>
    <h1>Not found</h1>
    <p>Nothing here at <code><?= htmlspecialchars($path) ?></code>.</p>
<?php endif; ?>
  </main>
</body>
</html>
