// Loopback OAuth 2.0 authorization server for tokenvault's conformance tests.
//
// A thin wrapper around panva's `oidc-provider` (exact version pinned in
// package.json), configured for one thing only: the client_credentials grant
// (RFC 6749 section 4.4) issuing RS256 JWT access tokens (RFC 9068) for a
// single resource server (RFC 8707 resource indicators). Everything else is
// oidc-provider's own, standard behaviour: this file decides configuration,
// not protocol.
//
// Interface (the Rust test-suite depends on it, keep it stable):
//
//   node tests/conformance/oidc/server.mjs --config CONFIG.json
//
//   CONFIG.json:
//     { "clients": [ { "client_id": "svc", "client_secret": "...",
//                      "auth_method": "client_secret_basic" | "client_secret_post",
//                      "scope": "api.read api.write" } ],
//       "access_token_lifetime_secs": 5,
//       "resource": "urn:tokenvault:test-api" }
//
//   - listens on 127.0.0.1 on a port the OS chooses (port 0);
//   - prints exactly one line on stdout, `LISTENING <port>`, once it serves,
//     and nothing else on stdout ever (all logs go to stderr);
//   - the issuer is `http://127.0.0.1:<port>`; the token endpoint is `/token`,
//     the key set `/jwks`, discovery `/.well-known/oauth-authorization-server`;
//   - `GET /stats` answers
//       {"grants": {"client_credentials": n}, "invalid_client": n, "requests": n}
//     and `POST /stats/reset` sets every counter to 0 (and answers the zeroed
//     stats);
//   - serves until killed (SIGTERM/SIGINT close it cleanly with exit code 0);
//   - exits non-zero, before printing LISTENING, on a bad command line or config.
//
// Client secrets are never logged.
//
// Behaviour of oidc-provider worth knowing when writing tests against it:
//   - client_secret_basic and client_secret_post are interchangeable: a client
//     registered with one is also accepted with the other (not enforced);
//   - a request without `scope` gets a token without scope (no `scope` member
//     in the response, no `scope` claim); requested scopes that are unknown to
//     the resource server are dropped silently, scopes of another client are
//     invalid_scope (400);
//   - a request without `resource` gets the configured resource (`aud` claim);
//     any other resource is invalid_target (400);
//   - a wrong secret or an unknown client is 401 invalid_client (with a
//     WWW-Authenticate: Basic header when the request used Basic).

import * as crypto from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';

// --- stdout belongs to the LISTENING line -----------------------------------
//
// oidc-provider prints its "NOTICE"s with console.info (stdout) and its
// "WARNING"s with console.warn (stderr); a few defaults we do not override
// could print a notice on first use (e.g. the default renderError). The Rust
// side reads stdout for the LISTENING line, so every console method is sent to
// stderr, and the LISTENING line is written with process.stdout.write below.
// This is done before oidc-provider is loaded (dynamic import further down).
for (const method of ['log', 'info', 'debug']) {
  console[method] = console.error;
}

function log(message) {
  process.stderr.write(`[oidc-conformance] ${message}\n`);
}

function fail(message, code = 2) {
  log(`error: ${message}`);
  process.exit(code);
}

// --- command line and config --------------------------------------------------

function parseArgs(argv) {
  let configPath;
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg === '--config') {
      configPath = argv[i + 1];
      i += 1;
    } else if (arg.startsWith('--config=')) {
      configPath = arg.slice('--config='.length);
    } else {
      fail(`unknown argument ${JSON.stringify(arg)}; usage: server.mjs --config CONFIG.json`);
    }
  }
  if (!configPath) {
    fail('usage: server.mjs --config CONFIG.json');
  }
  return { configPath };
}

const AUTH_METHODS = new Set(['client_secret_basic', 'client_secret_post']);

// Validates CONFIG.json strictly so that a typo in a Rust test fails at start
// (non-zero exit, no LISTENING line) instead of as a confusing token error.
function loadConfig(path) {
  let config;
  try {
    config = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    fail(`cannot read config ${path}: ${err.message}`);
  }
  if (config === null || typeof config !== 'object' || Array.isArray(config)) {
    fail('config must be a JSON object');
  }

  const lifetime = config.access_token_lifetime_secs;
  if (!Number.isSafeInteger(lifetime) || lifetime <= 0) {
    fail('access_token_lifetime_secs must be a positive integer');
  }

  const { resource } = config;
  // oidc-provider requires resource indicators to be absolute URIs without a
  // fragment (RFC 8707 section 2); check it here to fail early.
  if (typeof resource !== 'string' || !URL.canParse(resource) || resource.includes('#')) {
    fail('resource must be an absolute URI without a fragment, e.g. "urn:tokenvault:test-api"');
  }

  if (!Array.isArray(config.clients) || config.clients.length === 0) {
    fail('clients must be a non-empty array');
  }
  const seen = new Set();
  const clients = config.clients.map((c, i) => {
    const where = `clients[${i}]`;
    if (c === null || typeof c !== 'object') fail(`${where} must be an object`);
    if (typeof c.client_id !== 'string' || !c.client_id) fail(`${where}.client_id must be a non-empty string`);
    if (seen.has(c.client_id)) fail(`${where}.client_id ${JSON.stringify(c.client_id)} is not unique`);
    seen.add(c.client_id);
    if (typeof c.client_secret !== 'string' || !c.client_secret) fail(`${where}.client_secret must be a non-empty string`);
    if (!AUTH_METHODS.has(c.auth_method)) fail(`${where}.auth_method must be one of ${[...AUTH_METHODS].join(', ')}`);
    if (typeof c.scope !== 'string') fail(`${where}.scope must be a string of space-separated scopes`);
    const scopes = c.scope.split(' ').filter(Boolean);
    if (scopes.length === 0) fail(`${where}.scope must name at least one scope`);
    // RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
    // oidc-provider rejects requests with other characters, but accepts them in
    // client metadata, so check here.
    const badScope = scopes.find((s) => !/^[\x21\x23-\x5B\x5D-\x7E]+$/.test(s));
    if (badScope !== undefined) fail(`${where}.scope has an invalid scope token ${JSON.stringify(badScope)}`);
    return {
      client_id: c.client_id,
      client_secret: c.client_secret,
      auth_method: c.auth_method,
      scopes,
    };
  });

  return { clients, lifetime, resource };
}

const { configPath } = parseArgs(process.argv.slice(2));
const config = loadConfig(configPath);

// Every scope any client may ask for. oidc-provider needs them in its static
// `scopes` list: a client's registered `scope` metadata may only name scopes
// listed there, and listed ("static") scopes are what it checks a request's
// `scope` against the client's registered `scope` with (invalid_scope when a
// client asks for a scope that is not its own).
const allScopes = [...new Set(config.clients.flatMap((c) => c.scopes))];

// --- signing key ----------------------------------------------------------------
//
// A fresh RSA key pair per run; the private JWK goes into the provider's
// keystore, which publishes its public part at /jwks. The kid is the RFC 7638
// JWK thumbprint of the public key. Generated asynchronously (on libuv's thread
// pool) so that it overlaps with loading oidc-provider: each takes ~0.1-0.5 s.
async function makeSigningKey() {
  const { privateKey } = await new Promise((resolve, reject) => {
    crypto.generateKeyPair('rsa', { modulusLength: 2048 }, (err, publicKey, privKey) => {
      if (err) reject(err);
      else resolve({ publicKey, privateKey: privKey });
    });
  });
  const jwk = privateKey.export({ format: 'jwk' });
  const thumbprintInput = JSON.stringify({ e: jwk.e, kty: jwk.kty, n: jwk.n });
  const kid = crypto.createHash('sha256').update(thumbprintInput).digest('base64url');
  return { ...jwk, kid, alg: 'RS256', use: 'sig' };
}
const signingKeyPromise = makeSigningKey();

// --- counters for GET /stats ----------------------------------------------------

const stats = {
  grants: { client_credentials: 0 },
  invalid_client: 0,
  requests: 0,
};

function resetStats() {
  stats.grants.client_credentials = 0;
  stats.invalid_client = 0;
  stats.requests = 0;
}

// --- the server -------------------------------------------------------------------
//
// The issuer must contain the port, and the port is only known once we listen
// on port 0; so the node:http server is created and bound first, and the
// provider is built after, with the bound port. Requests that would arrive in
// between get 503 (none can: the port is announced only afterwards).

let providerCallback = null;
const TOKEN_PATH = '/token'; // oidc-provider's default `routes.token`

function sendJson(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json; charset=utf-8',
    'content-length': Buffer.byteLength(text),
    'cache-control': 'no-store',
  });
  res.end(text);
}

const server = http.createServer((req, res) => {
  // URL.parse returns null (instead of throwing) for a malformed request
  // target; oidc-provider answers those.
  const pathname = URL.parse(req.url, 'http://127.0.0.1')?.pathname;

  // Our own routes, answered without oidc-provider.
  if (pathname === '/stats') {
    if (req.method === 'GET') return sendJson(res, 200, stats);
    res.setHeader('allow', 'GET');
    return sendJson(res, 405, { error: 'method_not_allowed' });
  }
  if (pathname === '/stats/reset') {
    if (req.method === 'POST') {
      resetStats();
      return sendJson(res, 200, stats);
    }
    res.setHeader('allow', 'POST');
    return sendJson(res, 405, { error: 'method_not_allowed' });
  }

  // Every HTTP request that reaches the token endpoint path counts, whatever
  // its method or outcome; counted on arrival, so the count is up to date by
  // the time the client has read the response.
  if (pathname === TOKEN_PATH) {
    stats.requests += 1;
  }

  if (!providerCallback) {
    return sendJson(res, 503, { error: 'temporarily_unavailable' });
  }
  return providerCallback(req, res);
});

// Keep-alive connections must not keep the process alive after SIGTERM.
function shutdown(signal) {
  log(`${signal}: shutting down`);
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen({ host: '127.0.0.1', port: 0 }, resolve);
});
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

// Loaded only now, after console has been redirected (see the top of the file).
// On Node < 22 it prints "oidc-provider WARNING: Unsupported runtime ..." to
// stderr; it works on Node 20 all the same.
const [{ default: Provider, errors }, signingKey] = await Promise.all([
  import('oidc-provider'),
  signingKeyPromise,
]);

const provider = new Provider(issuer, {
  // Static clients, one per config entry. No redirect URIs and no response
  // types: these clients never use the authorization endpoint.
  clients: config.clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: c.auth_method,
    scope: c.scopes.join(' '),
  })),

  // Only the two methods the config can name. NOTE: oidc-provider treats
  // client_secret_basic and client_secret_post as interchangeable: a client
  // registered with either one is accepted with the other too (its
  // lib/shared/client_auth.js accepts both for a client secret). Any other
  // mechanism (none, JWT assertions) is invalid_client. The grant.success log
  // line on stderr says which of the two a request used.
  clientAuthMethods: [...AUTH_METHODS],

  // See allScopes above. openid/offline_access are oidc-provider's defaults,
  // kept so that discovery looks like any other oidc-provider's.
  scopes: ['openid', 'offline_access', ...allScopes],

  jwks: { keys: [signingKey] },

  features: {
    clientCredentials: { enabled: true },
    // Not needed (no end-user flows), and it prints a warning when used.
    devInteractions: { enabled: false },
    resourceIndicators: {
      enabled: true,
      // A request without a `resource` parameter gets the configured one.
      defaultResource: async () => config.resource,
      useGrantedResource: async () => true,
      // The only resource server there is. Asking for any other resource is
      // invalid_target (RFC 8707 section 2).
      getResourceServerInfo: async (ctx, resourceIndicator) => {
        if (resourceIndicator !== config.resource) {
          throw new errors.InvalidTarget();
        }
        return {
          scope: allScopes.join(' '),
          accessTokenFormat: 'jwt',
          accessTokenTTL: config.lifetime,
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },

  ttl: {
    // The lifetime of a client_credentials token is the resource server's
    // accessTokenTTL (= access_token_lifetime_secs). Set explicitly: the
    // default function does the same but prints a NOTICE on first use.
    ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? config.lifetime,
  },

  // No CORS for anyone (the default prints a NOTICE on first use).
  clientBasedCORS: () => false,
});

// Plain http on loopback: no `proxy` (X-Forwarded-* headers are not trusted),
// so ctx.secure is false; oidc-provider needs nothing more for client_credentials
// over http.
provider.proxy = false;

// --- events -----------------------------------------------------------------------
//
// grant.success fires after a token endpoint grant succeeded (before the
// response is written). A wrong client secret, an unknown client or a client
// using another authentication method than its registered one is an
// InvalidClientAuth error (401 invalid_client) raised by the token endpoint's
// client authentication, which fires grant.error. server_error fires instead of
// grant.error for unexpected (500) errors; those are logged only.
provider.on('grant.success', (ctx) => {
  const grantType = ctx.oidc.params?.grant_type;
  if (grantType === 'client_credentials') {
    stats.grants.client_credentials += 1;
  }
  // How the client actually authenticated (see the note on auth methods
  // below): an Authorization header means client_secret_basic.
  const usedMethod = ctx.headers.authorization !== undefined ? 'client_secret_basic' : 'client_secret_post';
  log(`grant.success grant_type=${grantType} client_id=${ctx.oidc.client?.clientId} auth=${usedMethod} registered=${ctx.oidc.client?.clientAuthMethod}`);
});

provider.on('grant.error', (ctx, err) => {
  if (err.error === 'invalid_client') {
    stats.invalid_client += 1;
  }
  // error_detail says why (e.g. "invalid secret provided"); it never contains
  // the secret itself.
  log(`grant.error status=${err.statusCode} error=${err.error} detail=${err.error_detail ?? err.error_description} client_id=${ctx.oidc?.client?.clientId ?? '-'}`);
});

provider.on('server_error', (ctx, err) => {
  log(`server_error path=${ctx.path}: ${err.stack || err}`);
});

// oidc-provider validates static client metadata lazily, on first use; look
// every client up now so that a bad config fails here, before LISTENING.
for (const c of config.clients) {
  try {
    // eslint-disable-next-line no-await-in-loop
    const client = await provider.Client.find(c.client_id);
    if (!client) throw new Error('not found');
  } catch (err) {
    fail(`client ${JSON.stringify(c.client_id)} is invalid: ${err.error_description || err.message}`, 1);
  }
}

providerCallback = provider.callback();

log(`issuer ${issuer}; resource ${config.resource}; access token lifetime ${config.lifetime}s; clients: ${config.clients
  .map((c) => `${c.client_id} (${c.auth_method}; ${c.scopes.join(' ')})`).join(', ')}`);

// The one and only line on stdout.
process.stdout.write(`LISTENING ${port}\n`);
