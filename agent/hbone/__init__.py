"""HBONE: node-to-node mTLS tunnels (HTTP/2 CONNECT over mTLS to port 15008, Istio ambient's ztunnel shape).

protocol.py and routes.py are sans-IO (what a CONNECT looks like, what the destination decides, which peer node
carries a destination); certs.py holds per-workload TLS material; conn.py drives one h2 connection and its
CONNECT streams; inbound.py / outbound.py are the two listeners; node.py composes them. See docs/hbone.md.
"""
