"""`corral nginx-config`: an nginx configuration for an app, made from its
config: nginx serves the static mappings itself and passes everything else to
corral over FastCGI, with the params the worker needs and corral's limits.
"""

from __future__ import annotations

import re

from corral.config import AppConfig, Bind

# Every param the worker reads, spelt out rather than `include fastcgi_params`,
# whose SCRIPT_NAME (the whole path) and missing REQUEST_URI differ between
# distributions.  The worker splits SCRIPT_NAME and PATH_INFO itself, from
# REQUEST_URI and the app's mount prefix, so they are right for a root app and
# for one under a prefix alike.
PARAMS = (
    ("GATEWAY_INTERFACE", "CGI/1.1"),
    ("SERVER_SOFTWARE", "nginx/$nginx_version"),
    ("REQUEST_METHOD", "$request_method"),
    ("REQUEST_URI", "$request_uri"),
    ("DOCUMENT_URI", "$document_uri"),
    ("QUERY_STRING", "$query_string"),
    ("CONTENT_TYPE", "$content_type"),
    ("CONTENT_LENGTH", "$content_length"),
    ("SERVER_PROTOCOL", "$server_protocol"),
    ("REQUEST_SCHEME", "$scheme"),
    ("HTTPS", "$https if_not_empty"),
    ("REMOTE_ADDR", "$remote_addr"),
    ("REMOTE_PORT", "$remote_port"),
    ("SERVER_ADDR", "$server_addr"),
    ("SERVER_PORT", "$server_port"),
    ("SERVER_NAME", "$host"),
)


def upstream_name(config: AppConfig) -> str:
    return "corral_" + re.sub(r"[^A-Za-z0-9_]", "_", config.name)


def fastcgi_address(config: AppConfig) -> str:
    """Where nginx finds corral: the app's FastCGI listener if it has one."""
    for bind in config.server["bind"]:
        if bind.protocol == "fastcgi":
            return f"unix:{bind.path}" if bind.path else f"{bind.host}:{bind.port}"
    return f"unix:/run/corral/{config.name}.sock"


def nginx_address(text: str) -> str:
    """An address as nginx's `server` directive writes it."""
    bind = Bind.parse(text if "+" in text else "fastcgi+" + text)
    if bind.path:
        return f"unix:{bind.path}"
    return f"[{bind.host}]:{bind.port}" if ":" in bind.host else f"{bind.host}:{bind.port}"


def render(config: AppConfig, listen: str = "80", server_name: str = "_",
           upstreams: list[str] | None = None) -> str:
    limits = config.server
    name = upstream_name(config)
    servers = [nginx_address(u) for u in upstreams] if upstreams else [fastcgi_address(config)]
    mount = config.mount or "/"
    out = [
        f"# nginx in front of the corral app {config.name!r} ({config.root}).",
        "# Made by `corral nginx-config`; both blocks belong in nginx's http {} context,",
        "# e.g. as /etc/nginx/conf.d/" + config.name + ".conf.",
        "",
        f"upstream {name} {{",
    ]
    for server in servers:
        out.append(f"    server {server};")
    if not upstreams:
        out.append(f"    # corral serve {config.root} --bind fastcgi+{servers[0]}")
    out += [
        "    keepalive 32;  # idle FastCGI connections nginx keeps open to corral",
        "}",
        "",
        "server {",
        f"    listen {listen};",
        f"    server_name {server_name};",
        "",
        "    # corral's limits: nginx refuses no request that corral would serve.",
        f"    client_max_body_size {limits['max_body']};",
        # Per line, up to corral's whole-head limit: nginx is never stricter,
        # and corral answers a head over max_header with its own 431.
        f"    large_client_header_buffers 4 {max(8, limits['max_header'] // 1024)}k;",
        f"    client_header_timeout {limits['header_timeout']:g}s;",
        f"    client_body_timeout {limits['body_timeout']:g}s;",
        f"    keepalive_timeout {limits['keepalive_timeout']:g}s;",
        "",
    ]
    for prefix, folder in config.static:
        out += [
            f"    location {prefix} {{  # static mapping: nginx sends these files itself",
            f"        alias {folder}/;",
            # No symlinks at all: stricter than corral's front, which follows
        # those that stay inside the folder.
        "        disable_symlinks on;",
            "        location ~ /\\. { return 404; }  # never dotfiles",
            "        expires 1h;",
            "    }",
        ]
    if config.config_file:
        out.append(f"    location = {mount.rstrip('/')}/{config.config_file.name} "
                   "{ return 404; }")
    out += [
        "",
        f"    location {mount} {{",
        f"        fastcgi_pass {name};",
        "        fastcgi_keep_conn on;  # reuse the upstream connections above",
        "        fastcgi_request_buffering on;  # whole bodies, as corral's own front does",
        "        fastcgi_read_timeout 300s;",
        "        fastcgi_buffers 16 16k;",
    ]
    width = max(len(k) for k, _ in PARAMS)
    out += [f"        fastcgi_param {k:<{width}} {v};" for k, v in PARAMS]
    out += ["    }", "}", ""]
    return "\n".join(out)
