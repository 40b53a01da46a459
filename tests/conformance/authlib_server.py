#!/usr/bin/env python3
"""Loopback OAuth2 authorization server for tokenvault's conformance tests.

The Rust test-suite starts this file as a child process to get a *real*,
independently written RFC 6749 token endpoint to talk to, instead of a mock
that shares our own assumptions. It is built on authlib's
``AuthorizationServer`` (Flask integration) with its ``ClientCredentialsGrant``
and ``RefreshTokenGrant``, and can play several token-endpoint styles:

* a Keycloak realm (``POST /realms/test/protocol/openid-connect/token``), with
  Keycloak's "use refresh tokens for client credentials" and refresh token
  rotation (``refresh_token`` + ``refresh_expires_in`` in replies);
* a Trulioo-like endpoint whose success reply is ``{"Token", "TokenType",
  "ExpiresIn"}`` (``reply_style: "trulioo"``);
* a Triumph-like endpoint that refuses any ``scope`` parameter;
* an issuer of JWT access tokens (``typ: at+jwt``, HS256, per-process key).

Usage::

    python authlib_server.py --config CONFIG.json

It binds 127.0.0.1 on a free port, prints exactly one line ``LISTENING <port>``
on stdout once it accepts connections, and serves until killed. Logs go to
stderr and never contain client secrets nor token values. See README.md next
to this file for the config keys and the test-only endpoints (/stats,
/stats/reset, /admin/expire-refresh-tokens, /health).
"""

import argparse
import base64
import binascii
import hmac
import json
import logging
import os
import secrets
import sys
import threading
import time
from urllib.parse import unquote_plus

# authlib refuses plain-http requests unless the host is a loopback address;
# we only ever bind 127.0.0.1, so accept whatever Host header a client sends.
os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")

from authlib.integrations.flask_oauth2 import AuthorizationServer  # noqa: E402
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin, grants  # noqa: E402
from authlib.oauth2.rfc6749.errors import (  # noqa: E402
    InvalidGrantError,
    InvalidScopeError,
)
from authlib.oauth2.rfc6749.util import scope_to_list  # noqa: E402
from flask import Flask, Response, jsonify, request  # noqa: E402
from joserfc import jwt  # noqa: E402
from joserfc.jwk import OctKey  # noqa: E402
from werkzeug.serving import WSGIRequestHandler, make_server  # noqa: E402

log = logging.getLogger("authlib-server")

DEFAULTS = {
    "access_token_lifetime_secs": 300,
    "refresh_token_lifetime_secs": 1800,
    "client_credentials_refresh_tokens": False,
    "rotate_refresh_tokens": True,
    "delegated_refresh_tokens": [],
    "reply_style": "standard",
    "jwt_access_tokens": False,
    "refuse_scope_parameter": False,
    "grant_scope_override": None,
}
SECRET_METHODS = {"client_secret_post", "client_secret_basic"}
# Every method authlib may try at the token endpoint; each client narrows it.
AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]


def load_config(path):
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    unknown = set(raw) - set(DEFAULTS) - {"clients"}
    if unknown:
        log.warning("ignoring unknown config keys: %s", ", ".join(sorted(unknown)))
    cfg = dict(DEFAULTS, **{k: v for k, v in raw.items() if v is not None})
    for key in ("access_token_lifetime_secs", "refresh_token_lifetime_secs"):
        cfg[key] = int(cfg[key])
    if cfg["reply_style"] not in ("standard", "trulioo"):
        raise SystemExit(f"config: reply_style must be standard or trulioo, not {cfg['reply_style']!r}")
    cfg["clients"] = {c["client_id"]: Client(c) for c in raw["clients"]}
    return cfg


class Client(ClientMixin):
    """A registered client; ``client_secret: null`` makes it public (auth ``none``)."""

    def __init__(self, c):
        self.client_id = c["client_id"]
        self.secret = c.get("client_secret")
        self.public = self.secret is None
        default_methods = ["none"] if self.public else sorted(SECRET_METHODS)
        self.auth_methods = list(c.get("auth_methods") or default_methods)
        allowed = {"none"} if self.public else SECRET_METHODS
        if not set(self.auth_methods) <= allowed:
            raise SystemExit(f"config: client {self.client_id}: auth_methods {self.auth_methods} not allowed")
        self.grant_types = list(c.get("grant_types") or ["client_credentials"])
        self.scope = c.get("scope") or ""

    def __repr__(self):  # authlib logs clients: never show the secret
        return f"<Client {self.client_id}>"

    def get_client_id(self):
        return self.client_id

    def get_allowed_scope(self, scope):
        return scope if scope else self.scope

    def check_client_secret(self, client_secret):
        return not self.public and hmac.compare_digest(self.secret.encode(), client_secret.encode())

    def check_endpoint_auth_method(self, method, endpoint):
        return method in self.auth_methods

    def check_grant_type(self, grant_type):
        # RFC 6749 §4.4: client_credentials is for confidential clients only.
        if grant_type == "client_credentials" and self.public:
            return False
        return grant_type in self.grant_types


class RefreshRecord(TokenMixin):
    """A refresh token we issued (or was configured as delegated)."""

    def __init__(self, client_id, scope, user, expires_at):
        self.client_id, self.scope, self.user = client_id, scope, user
        self.expires_at = expires_at  # time.monotonic() deadline, None = never
        self.spent = False  # True once rotated away

    def check_client(self, client):
        return client.client_id == self.client_id

    def get_scope(self):
        return self.scope

    def is_expired(self):
        return self.expires_at is not None and time.monotonic() >= self.expires_at


class State:
    """All mutable state, shared between Flask's worker threads under ``lock``."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.lock = threading.Lock()
        self.refresh = {}  # refresh token value -> RefreshRecord
        self.seq = 0  # access token counter
        self.jwt_key = OctKey.import_key(secrets.token_bytes(32))
        self.reset_stats()
        for d in cfg["delegated_refresh_tokens"]:
            client = cfg["clients"].get(d["client_id"])
            if client is None:
                raise SystemExit(f"config: delegated refresh token for unknown client {d['client_id']!r}")
            rec = RefreshRecord(client.client_id, d.get("scope") or client.scope, d.get("user"), None)
            self.refresh[d["refresh_token"]] = rec

    def reset_stats(self):
        self.stats = {
            "grants": {"client_credentials": 0, "refresh_token": 0},
            "refresh_reuse": 0,
            "invalid_client": 0,
            "issued_refresh_tokens": 0,
            "requests": 0,
        }

    def issue_refresh_tokens(self):
        # Trulioo-style endpoints never hand out refresh tokens.
        return self.cfg["reply_style"] != "trulioo"

    def granted_scope(self, scope):
        override = self.cfg["grant_scope_override"]
        return override if override is not None else scope


def authenticate_client_secret_basic(query_client, req):
    """client_secret_basic per RFC 6749 §2.3.1: id and secret are
    form-urlencoded *then* base64-encoded. authlib's built-in decoder uses
    ``unquote`` (so "+" stays "+"); Keycloak and the RFC say "+" is a space."""
    scheme, _, b64 = req.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic" or not b64.strip():
        return None
    try:
        decoded = base64.b64decode(b64.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    raw_id, sep, raw_secret = decoded.partition(":")
    client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
    if not sep or not client_id or not secret:
        return None
    client = query_client(client_id)
    if client is not None and client.check_client_secret(secret):
        return client
    return None


class TokenServer(AuthorizationServer):
    """authlib's Flask AuthorizationServer with our error accounting."""

    state = None  # set by build_app

    def handle_error_response(self, req, error):
        if error.error == "invalid_client":
            # authlib answers 400 for an unknown client sent in the form; RFC
            # 6749 §5.2 allows 401 and the tests expect 401 for every refused
            # client authentication.
            error.status_code = 401
            with self.state.lock:
                self.state.stats["invalid_client"] += 1
        log.info("token request refused: %s (grant_type=%s)", error.error, req.payload.grant_type)
        return super().handle_error_response(req, error)


class ClientCredentialsGrant(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS

    def validate_requested_scope(self):
        # authlib only checks the server-wide scopes_supported; be Keycloak-like
        # and refuse scopes the client is not registered for.
        requested = set(scope_to_list(self.request.payload.scope) or [])
        if not requested <= set(scope_to_list(self.client.scope) or []):
            raise InvalidScopeError("Requested scope exceeds the client's scope")

    def create_token_response(self):
        st = self.server.state
        scope = st.granted_scope(self.request.payload.scope or self.client.scope)
        # authlib's grant never includes a refresh token here (RFC 6749 §4.4.3
        # "SHOULD NOT"); Keycloak can be told to, and so can we.
        with_rt = st.cfg["client_credentials_refresh_tokens"] and st.issue_refresh_tokens()
        token = self.generate_token(scope=scope, include_refresh_token=with_rt)
        self.save_token(token)
        log.info("client_credentials: issued to %s (scope=%r, refresh=%s)", self.client.client_id, scope, with_rt)
        return 200, token, self.TOKEN_RESPONSE_HEADER


class RefreshTokenGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS

    @property
    def INCLUDE_NEW_REFRESH_TOKEN(self):  # noqa: N802 (authlib's name)
        st = self.server.state
        return st.cfg["rotate_refresh_tokens"] and st.issue_refresh_tokens()

    def _check_usable(self, rec):
        """Refuse spent (counted as reuse) and expired tokens. Caller holds the lock."""
        st = self.server.state
        if rec.spent:
            st.stats["refresh_reuse"] += 1
            log.warning("refresh_token: reuse of a spent refresh token by %s", rec.client_id)
            raise InvalidGrantError("Refresh token was already used")
        if rec.is_expired():
            raise InvalidGrantError("Refresh token expired")

    def authenticate_refresh_token(self, refresh_token):
        st = self.server.state
        with st.lock:
            rec = st.refresh.get(refresh_token)
            if rec is None:
                raise InvalidGrantError("Unknown refresh token")
            self._check_usable(rec)
            return rec

    def authenticate_user(self, rec):
        # Called by authlib right before issuing: re-check and spend the token
        # under the lock so two concurrent uses cannot both succeed.
        st = self.server.state
        with st.lock:
            self._check_usable(rec)
            if self.INCLUDE_NEW_REFRESH_TOKEN:
                rec.spent = True
        # authlib insists on a truthy user; a client's own token gets
        # Keycloak's service-account name.
        return rec.user or f"service-account-{rec.client_id}"

    def issue_token(self, user, rec):
        st = self.server.state
        scope = st.granted_scope(self.request.payload.scope or rec.get_scope())
        token = self.generate_token(user=user, scope=scope, include_refresh_token=self.INCLUDE_NEW_REFRESH_TOKEN)
        log.info("refresh_token: issued to %s (scope=%r, rotated=%s)", rec.client_id, scope, "refresh_token" in token)
        return token

    def revoke_old_credential(self, rec):
        pass  # already spent atomically in authenticate_user


def build_app(cfg):
    st = State(cfg)
    app = Flask(__name__)

    def query_client(client_id):
        return cfg["clients"].get(client_id)

    def save_token(token, req):
        if "refresh_token" not in token:
            return
        parent = req.refresh_token  # set by the refresh_token grant only
        # RFC 6749 §6: a rotated refresh token keeps the original scope. Every
        # newly issued refresh token (also a delegated one's successor)
        # expires refresh_token_lifetime_secs after issue.
        rec = RefreshRecord(
            req.client.client_id,
            parent.scope if parent is not None else token.get("scope", ""),
            parent.user if parent is not None else None,
            time.monotonic() + cfg["refresh_token_lifetime_secs"],
        )
        with st.lock:
            st.refresh[token["refresh_token"]] = rec
            st.stats["issued_refresh_tokens"] += 1

    def generate_token(grant_type, client, user=None, scope=None, expires_in=None, include_refresh_token=True):
        lifetime = cfg["access_token_lifetime_secs"]
        with st.lock:
            st.seq += 1
            n = st.seq
        if cfg["jwt_access_tokens"]:
            now = int(time.time())
            claims = {
                "iss": request.url_root.rstrip("/") + "/realms/test",
                "sub": client.client_id,
                "client_id": client.client_id,
                "scope": scope or "",
                "iat": now,
                "exp": now + lifetime,
                "jti": f"{n}-{secrets.token_hex(8)}",
            }
            if user and not user.startswith("service-account-"):
                claims["preferred_username"] = user
            access_token = jwt.encode({"alg": "HS256", "typ": "at+jwt"}, claims, st.jwt_key)
        else:
            access_token = f"at-{n}-{secrets.token_hex(16)}"
        token = {"access_token": access_token, "token_type": "Bearer", "expires_in": lifetime}
        if scope:
            token["scope"] = scope
        if include_refresh_token:
            token["refresh_token"] = "rt-" + secrets.token_hex(24)
            token["refresh_expires_in"] = cfg["refresh_token_lifetime_secs"]
        return token

    server = TokenServer(app, query_client=query_client, save_token=save_token)
    server.state = st
    server.register_token_generator("default", generate_token)
    server.register_client_auth_method("client_secret_basic", authenticate_client_secret_basic)
    server.register_grant(ClientCredentialsGrant)
    server.register_grant(RefreshTokenGrant)

    def oauth_error(status, error, description):
        body = json.dumps({"error": error, "error_description": description})
        return Response(body, status=status, headers={"Content-Type": "application/json", "Cache-Control": "no-store"})

    @app.post("/token")
    @app.post("/realms/test/protocol/openid-connect/token")
    def token_endpoint():
        with st.lock:
            st.stats["requests"] += 1
        # RFC 6749 §2.3.1/§3.2: parameters belong in the body, never the URI
        # (authlib would otherwise read them from the query string too).
        if request.args:
            log.info("token request refused: parameters in the query string")
            return oauth_error(400, "invalid_request", "Parameters must be sent in the request body")
        if cfg["refuse_scope_parameter"] and "scope" in request.form:
            log.info("token request refused: scope parameter not accepted")
            return oauth_error(400, "invalid_request", "The scope parameter is not supported")
        grant_type = request.form.get("grant_type", "")
        resp = server.create_token_response()
        if resp.status_code != 200:
            return resp
        with st.lock:
            st.stats["grants"][grant_type] = st.stats["grants"].get(grant_type, 0) + 1
        if cfg["reply_style"] == "trulioo":
            t = json.loads(resp.get_data())
            body = {"Token": t["access_token"], "TokenType": "Bearer", "ExpiresIn": t["expires_in"]}
            if "scope" in t:
                body["scope"] = t["scope"]
            resp.set_data(json.dumps(body))
        return resp

    @app.get("/stats")
    def stats():
        with st.lock:
            return jsonify(json.loads(json.dumps(st.stats)))

    @app.post("/stats/reset")
    def stats_reset():
        with st.lock:
            st.reset_stats()
        return jsonify({})

    @app.post("/admin/expire-refresh-tokens")
    def expire_refresh_tokens():
        with st.lock:
            past = time.monotonic() - 1
            for rec in st.refresh.values():
                rec.expires_at = past
        log.info("admin: every refresh token marked expired")
        return jsonify({})

    @app.get("/health")
    def health():
        return Response("ok", mimetype="text/plain")

    return app


class RequestLogHandler(WSGIRequestHandler):
    """Access log without the query string (it could carry credentials)."""

    def log_request(self, code="-", size="-"):
        path = getattr(self, "path", "?").split("?", 1)[0]
        self.log("info", '"%s %s" %s', getattr(self, "command", "?"), path, code)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="path of the JSON config")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s: %(message)s")
    # authlib's debug logs print whole token dicts (refresh tokens included).
    logging.getLogger("authlib").setLevel(logging.WARNING)

    app = build_app(load_config(args.config))
    srv = make_server("127.0.0.1", 0, app, threaded=True, request_handler=RequestLogHandler)
    print(f"LISTENING {srv.server_port}", flush=True)
    log.info("serving on http://127.0.0.1:%d", srv.server_port)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
