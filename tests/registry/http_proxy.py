#!/usr/bin/python3
"""A forward HTTP proxy on 127.0.0.1 for the docker:// tests: CONNECT tunnels
(https) and absolute-URI requests (plain http), each request line appended to
LOG. It picks a free port and writes it to PORTFILE.

usage: http_proxy.py PORTFILE LOG
"""
import socket
import sys
import threading
import urllib.parse


def relay(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def handle(client, log):
    buf = b''
    while b'\r\n\r\n' not in buf:
        data = client.recv(65536)
        if not data:
            client.close()
            return
        buf += data
    head, rest = buf.split(b'\r\n\r\n', 1)
    lines = head.split(b'\r\n')
    request = lines[0].decode('latin-1')
    with open(log, 'a') as out:
        out.write(request + '\n')
    method, target, _ = request.split(' ', 2)
    try:
        if method == 'CONNECT':
            host, port = target.rsplit(':', 1)
            server = socket.create_connection((host, int(port)))
            client.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
        else:
            url = urllib.parse.urlsplit(target)
            server = socket.create_connection((url.hostname, url.port or 80))
            path = url.path + ('?' + url.query if url.query else '')
            kept = b''.join(h + b'\r\n' for h in lines[1:]
                            if not h.lower().startswith((b'proxy-', b'connection:')))
            server.sendall(f'{method} {path} HTTP/1.1\r\n'.encode() + kept +
                           b'Connection: close\r\n\r\n')
    except OSError:
        client.sendall(b'HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n')
        client.close()
        return
    if rest:
        server.sendall(rest)
    back = threading.Thread(target=relay, args=(server, client), daemon=True)
    back.start()
    relay(client, server)
    back.join()
    client.close()
    server.close()


def main():
    portfile, log = sys.argv[1], sys.argv[2]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(('127.0.0.1', 0))
    listener.listen(64)
    with open(portfile + '.tmp', 'w') as f:
        f.write(str(listener.getsockname()[1]))
    import os
    os.rename(portfile + '.tmp', portfile)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=handle, args=(client, log), daemon=True).start()


if __name__ == '__main__':
    main()
