// Prints a fresh private JWKS (one key per algorithm, new kids every run).
//
// Usage: node genkeys.mjs [--algs RS256,ES256]
//   --algs  comma separated algorithms (RS256, ES256, ...), default RS256,ES256
//
// The kid is `<alg lowercased>-<first 16 chars of the RFC 7638 thumbprint>`, so two runs
// never share a kid and a test can restart the issuer with rotated keys on the same port.

import process from 'node:process';
import { pathToFileURL } from 'node:url';

import { calculateJwkThumbprint, exportJWK, generateKeyPair } from 'jose';

const DEFAULT_ALGS = ['RS256', 'ES256'];

export async function generatePrivateJwks(algs = DEFAULT_ALGS) {
  const keys = [];
  for (const alg of algs) {
    const { privateKey } = await generateKeyPair(alg, { extractable: true, modulusLength: 2048 });
    const jwk = await exportJWK(privateKey);
    const thumbprint = await calculateJwkThumbprint(jwk);
    keys.push({ ...jwk, kid: `${alg.toLowerCase()}-${thumbprint.slice(0, 16)}`, alg, use: 'sig' });
  }
  return { keys };
}

async function cli(argv) {
  let algs = DEFAULT_ALGS;
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === '--algs') {
      algs = (argv[i + 1] ?? '').split(',').filter(Boolean);
      i += 1;
    } else {
      process.stderr.write(`genkeys: unknown argument ${argv[i]}\nusage: node genkeys.mjs [--algs RS256,ES256]\n`);
      process.exit(64);
    }
  }
  const jwks = await generatePrivateJwks(algs);
  process.stdout.write(`${JSON.stringify(jwks, null, 2)}\n`);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  cli(process.argv.slice(2)).catch((err) => {
    process.stderr.write(`genkeys: ${err.stack ?? err}\n`);
    process.exit(1);
  });
}
