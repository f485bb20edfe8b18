// OAuth2 token issuer for the smart-fhir-proxy test and demo stack.
//
// Usage: node issuer.mjs CONFIG.json [--parent-pid N]
//
// CONFIG.json:
// {
//   "port": 4455,                          // optional when "issuer" carries the port
//   "issuer": "http://127.0.0.1:4455",
//   "keys": { "keys": [ private JWKs with kid, alg ] },   // optional: generated when absent
//   "clients": [ { "client_id": "app", "client_secret": "s3cret",
//                  "scopes": "patient/Observation.rs launch/patient",   // or "*": any scope
//                  "patient": "p1", "fhirUser": "Practitioner/pr1",
//                  "alg": "RS256" | "ES256",    // signing alg of this client's access tokens
//                  "kid": "...",               // optional: sign with this exact key
//                  "resources": [ ... ],       // optional: the only `resource=` values allowed
//                  "token_ttl": 300 } ],       // optional: access token lifetime in seconds
//   "resources": [ "http://127.0.0.1:8080/demo" ],   // accepted `resource=` values (= aud);
//                                          // a value ending in `*` accepts every resource
//                                          // starting with what comes before the `*`
//   "token_ttl": 3600                      // optional default lifetime in seconds
// }
//
// Access tokens are JWTs (typ at+jwt) only when the token request names one of
// "resources" with `resource=`; without it oidc-provider issues an opaque token.
// The granted scope is exactly the requested scope; asking for a scope the client
// is not allowed is an `invalid_scope` error (nothing is silently dropped). A client
// whose "scopes" is "*" may ask for any scope (syntax: RFC 6749 scope tokens, so `/`,
// `.`, `*`, `?`, `=`, `|` pass through unchanged). Without `scope=` the token carries
// no `scope` claim.
//
// RFC 7662 for JWT access tokens: oidc-provider refuses to introspect its own structured
// (JWT) access tokens ("Structured JWT Tokens cannot be introspected"), so this wrapper
// adds `POST /rfc7662/introspect` and `POST /rfc7662/revoke` (client_secret_basic of any
// configured client, form field `token`). Introspection verifies the JWT with the
// issuer's own keys and issuer, checks expiry, and reports `active: false` for tokens
// whose `jti` was revoked through `/rfc7662/revoke`. oidc-provider's own
// `/token/introspection` and `/token/revocation` stay for opaque tokens.
//
// With --parent-pid N the issuer exits once process N is gone (checked every second),
// so processes started by tests never outlive the test run.

import { readFileSync } from 'node:fs';
import process from 'node:process';

import { createLocalJWKSet, jwtVerify } from 'jose';
import Provider, { errors } from 'oidc-provider';

import { generatePrivateJwks } from './genkeys.mjs';

function usage(message) {
  process.stderr.write(`issuer: ${message}\nusage: node issuer.mjs CONFIG.json [--parent-pid N]\n`);
  process.exit(64);
}

function parseArgs(argv) {
  let configPath;
  let parentPid;
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg === '--parent-pid') {
      parentPid = Number.parseInt(argv[i + 1] ?? '', 10);
      if (!Number.isInteger(parentPid) || parentPid <= 0) usage('--parent-pid needs a pid');
      i += 1;
    } else if (arg.startsWith('--')) {
      usage(`unknown option ${arg}`);
    } else if (configPath === undefined) {
      configPath = arg;
    } else {
      usage(`unexpected argument ${arg}`);
    }
  }
  if (!configPath) usage('missing CONFIG.json');
  return { configPath, parentPid };
}

function isAlive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return err.code === 'EPERM';
  }
}

const ALGS = new Set(['RS256', 'ES256']);

function loadConfig(path) {
  const cfg = JSON.parse(readFileSync(path, 'utf8'));
  if (typeof cfg.issuer !== 'string') usage('config: "issuer" is required');
  const issuerUrl = new URL(cfg.issuer);
  const port = cfg.port ?? Number.parseInt(issuerUrl.port, 10);
  if (!Number.isInteger(port) || port <= 0) usage('config: "port" is required');
  if (!Array.isArray(cfg.clients) || cfg.clients.length === 0) usage('config: "clients" must be a non-empty array');
  if (!Array.isArray(cfg.resources)) usage('config: "resources" must be an array');
  for (const c of cfg.clients) {
    if (!c.client_id || !c.client_secret) usage('config: every client needs client_id and client_secret');
    if (typeof c.scopes !== 'string') usage(`config: client ${c.client_id}: "scopes" must be a space separated string`);
    if (c.resources !== undefined && !Array.isArray(c.resources)) {
      usage(`config: client ${c.client_id}: "resources" must be an array`);
    }
    if (c.alg !== undefined && !ALGS.has(c.alg)) usage(`config: client ${c.client_id}: alg must be RS256 or ES256`);
  }
  return { ...cfg, port, host: cfg.host ?? '127.0.0.1' };
}

const scopeList = (s) => (s ?? '').split(' ').filter(Boolean);

// `resources` entries: exact URLs, or prefixes written with a trailing `*`.
function resourceMatcher(patterns) {
  return (resource) => patterns.some((p) => (p.endsWith('*') ? resource.startsWith(p.slice(0, -1)) : resource === p));
}

async function main() {
  const { configPath, parentPid } = parseArgs(process.argv.slice(2));
  const cfg = loadConfig(configPath);
  const jwks = cfg.keys ?? await generatePrivateJwks();
  const knownResource = resourceMatcher(cfg.resources);
  const defaultTtl = cfg.token_ttl ?? 3600;

  // oidc-provider only accepts client `scope` values it knows, so the provider's scope
  // list is the union of every client's allowed scopes.
  const allScopes = new Set(['openid', 'offline_access']);
  for (const c of cfg.clients) {
    if (c.scopes !== '*') scopeList(c.scopes).forEach((s) => allScopes.add(s));
  }

  const clients = cfg.clients.map((c) => {
    const client = {
      client_id: c.client_id,
      client_secret: c.client_secret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      // client_secret_post is accepted as well
      token_endpoint_auth_method: 'client_secret_basic',
      token_alg: c.alg ?? 'RS256',
    };
    // No `scope` metadata = oidc-provider lets the client ask for anything.
    if (c.scopes !== '*') client.scope = scopeList(c.scopes).join(' ');
    if (c.patient !== undefined) client.patient = c.patient;
    if (c.fhirUser !== undefined) client.fhirUser = c.fhirUser;
    if (c.kid !== undefined) client.token_kid = c.kid;
    if (c.token_ttl !== undefined) client.token_ttl = c.token_ttl;
    if (c.resources !== undefined) client.token_resources = c.resources;
    return client;
  });

  const provider = new Provider(cfg.issuer, {
    clients,
    jwks,
    scopes: [...allScopes],
    claims: { openid: ['sub'] },
    extraClientMetadata: {
      properties: ['patient', 'fhirUser', 'token_alg', 'token_kid', 'token_ttl', 'token_resources'],
      validator(ctx, key, value) {
        if (value === undefined) return;
        if (key === 'token_resources') {
          if (!Array.isArray(value)) throw new errors.InvalidClientMetadata(`${key} must be an array`);
        } else if (key === 'token_ttl') {
          if (!Number.isInteger(value) || value <= 0) throw new errors.InvalidClientMetadata(`${key} must be a positive integer`);
        } else if (typeof value !== 'string') {
          throw new errors.InvalidClientMetadata(`${key} must be a string`);
        }
      },
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async (ctx, client, oneOf) => oneOf,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (ctx, resourceIndicator, client) => {
          if (!knownResource(resourceIndicator)) {
            throw new errors.InvalidTarget(`unknown resource ${resourceIndicator}`);
          }
          if (client.token_resources && !resourceMatcher(client.token_resources)(resourceIndicator)) {
            throw new errors.InvalidTarget(`resource ${resourceIndicator} is not allowed for this client`);
          }
          const requested = scopeList(ctx.oidc.params?.scope);
          const allowed = new Set(client.scope === undefined ? requested : scopeList(client.scope));
          for (const s of requested) {
            if (!allowed.has(s)) throw new errors.InvalidScope('requested scope is not allowed', s);
          }
          const sign = { alg: client.token_alg ?? 'RS256' };
          if (client.token_kid) sign.kid = client.token_kid;
          return {
            scope: [...allowed].join(' '),
            audience: resourceIndicator,
            accessTokenFormat: 'jwt',
            accessTokenTTL: client.token_ttl ?? defaultTtl,
            jwt: { sign },
          };
        },
      },
    },
    extraTokenClaims: async (ctx, token) => {
      const client = ctx?.oidc?.client;
      if (!client || token.kind === 'RefreshToken') return undefined;
      const claims = {};
      if (client.patient !== undefined) claims.patient = client.patient;
      if (client.fhirUser !== undefined) claims.fhirUser = client.fhirUser;
      return claims;
    },
    ttl: {
      AccessToken: (ctx, token) => token.resourceServer?.accessTokenTTL ?? defaultTtl,
      ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? defaultTtl,
    },
    clientBasedCORS: () => true,
  });

  // --- RFC 7662 for JWT access tokens (see the header comment) ---------------------------
  const publicJwks = {
    keys: jwks.keys.map(({ d, p, q, dp, dq, qi, ...pub }) => pub),
  };
  const localKeys = createLocalJWKSet(publicJwks);
  const revoked = new Set();
  const readForm = (req) => new Promise((resolve, reject) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => {
      body += chunk;
      if (body.length > 65536) reject(new Error('body too large'));
    });
    req.on('end', () => resolve(new URLSearchParams(body)));
    req.on('error', reject);
  });
  const authenticated = (ctx) => {
    const [scheme, value] = (ctx.get('authorization') || '').split(' ');
    if (scheme?.toLowerCase() !== 'basic' || !value) return false;
    const decoded = Buffer.from(value, 'base64').toString('utf8');
    const sep = decoded.indexOf(':');
    const id = decodeURIComponent(decoded.slice(0, sep));
    const secret = decodeURIComponent(decoded.slice(sep + 1));
    return cfg.clients.some((c) => c.client_id === id && c.client_secret === secret);
  };
  provider.use(async (ctx, next) => {
    const route = ctx.method === 'POST' && ({ '/rfc7662/introspect': 'introspect', '/rfc7662/revoke': 'revoke' })[ctx.path];
    if (!route) return next();
    if (!authenticated(ctx)) {
      ctx.status = 401;
      ctx.body = { error: 'invalid_client' };
      return undefined;
    }
    const form = await readForm(ctx.req);
    let payload;
    try {
      ({ payload } = await jwtVerify(form.get('token') ?? '', localKeys, { issuer: cfg.issuer }));
    } catch {
      payload = undefined;
    }
    if (route === 'revoke') {
      if (payload?.jti) revoked.add(payload.jti);
      ctx.status = 200;
      ctx.body = {};
      return undefined;
    }
    ctx.body = payload && !revoked.has(payload.jti)
      ? { ...payload, active: true, token_type: 'Bearer' }
      : { active: false };
    return undefined;
  });

  provider.on('server_error', (ctx, err) => {
    process.stderr.write(`issuer: server_error: ${err.stack ?? err}\n`);
  });

  const server = provider.listen(cfg.port, cfg.host, () => {
    process.stdout.write(`${JSON.stringify({ ready: true, issuer: cfg.issuer, pid: process.pid })}\n`);
  });
  server.on('error', (err) => {
    process.stderr.write(`issuer: cannot listen on ${cfg.host}:${cfg.port}: ${err.message}\n`);
    process.exit(1);
  });

  const shutdown = () => {
    server.close(() => process.exit(0));
    server.closeAllConnections?.();
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);

  if (parentPid !== undefined) {
    setInterval(() => {
      if (!isAlive(parentPid)) {
        process.stderr.write(`issuer: parent ${parentPid} is gone, exiting\n`);
        shutdown();
      }
    }, 1000).unref();
  }
}

main().catch((err) => {
  process.stderr.write(`issuer: ${err.stack ?? err}\n`);
  process.exit(1);
});
