"""nginx as an SSE relay: the standard ``proxy_buffering off`` reverse-proxy configuration.

Not a Python server: this module renders a self-contained ``nginx.conf`` (one worker, all paths
inside a work directory, keep-alive upstream pool, buffering off, one-hour read timeout) and
starts ``nginx -c <conf> -p <workdir>`` in the foreground. nginx closes the upstream connection
itself when the client goes away (``proxy_ignore_client_abort`` is off by default). Run as a
script it prints the config, or with ``--run`` replaces itself with nginx.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from urllib.parse import urlsplit

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_available() -> bool:
    return shutil.which("nginx") is not None or os.path.exists("/usr/sbin/nginx")


def nginx_config(
    port: int, upstream_host_port: str, workdir: str, upstream_prefix: str = "/v1/"
) -> str:
    w = os.path.abspath(workdir)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {w}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process on;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    keepalive_timeout 3600s;
    client_max_body_size 100m;
{temp_paths}

    upstream sse_upstream {{
        server {upstream_host_port};
        keepalive 64;
    }}

    server {{
        listen 127.0.0.1:{port} backlog=2048;

        location /v1/ {{
            proxy_pass http://sse_upstream{upstream_prefix};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 3600s;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def _command(port: int, upstream_url: str, workdir: str) -> list[str]:
    url = urlsplit(upstream_url)
    prefix = url.path.rstrip("/") + "/"
    os.makedirs(workdir, exist_ok=True)
    conf = os.path.join(os.path.abspath(workdir), "nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_config(port, url.netloc, workdir, prefix))
    # -e: log startup errors to the work dir, not the (maybe unwritable) compiled-in path
    return [NGINX, "-c", conf, "-p", os.path.abspath(workdir) + "/", "-e", "error.log"]


def start_nginx(port: int, upstream_url: str, workdir: str) -> subprocess.Popen[bytes]:
    """Write ``<workdir>/nginx.conf`` and start nginx in the foreground; stop it with
    ``terminate()`` (SIGTERM, fast shutdown)."""
    return subprocess.Popen(_command(port, upstream_url, workdir))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="nginx SSE relay peer")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9001/v1")
    parser.add_argument("--workdir", default="/tmp/sse-peer-nginx")
    parser.add_argument("--run", action="store_true", help="exec nginx instead of printing")
    args = parser.parse_args()
    if args.run:
        cmd = _command(args.port, args.upstream, args.workdir)
        os.execv(cmd[0], cmd)
    url = urlsplit(args.upstream)
    print(nginx_config(args.port, url.netloc, args.workdir, url.path.rstrip("/") + "/"), end="")
