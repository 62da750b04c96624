// RFC 9162 inclusion proofs checked in the browser, trusting nothing but SHA-256.
// leaf = SHA-256(0x00 || binary CID), node = SHA-256(0x01 || left || right); the proof must lead from
// the receipt's leaf to the root in the log's signed tree head. WebCrypto does the hashing; pages
// opened over plain http from another host are not a "secure context" and get no crypto.subtle, so a
// small pure-JS SHA-256 stands in there (and says so).

const subtle = globalThis.isSecureContext && globalThis.crypto && globalThis.crypto.subtle;

export function hashImpl() {
  return subtle ? "WebCrypto SHA-256" : "JS SHA-256 (page is not a secure context)";
}

export async function sha256(bytes) {
  if (subtle) return new Uint8Array(await subtle.digest("SHA-256", bytes));
  return sha256js(bytes);
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

export const leafHash = (data) => sha256(concat(Uint8Array.of(0), data));
export const nodeHash = (left, right) => sha256(concat(Uint8Array.of(1), left, right));

export function hexToBytes(hex) {
  if (typeof hex !== "string" || hex.length % 2 || /[^0-9a-f]/i.test(hex)) throw new Error("not hex");
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(i * 2, 2), 16);
  return out;
}

export const bytesToHex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");

export function equalBytes(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

// CIDv1 in base32 ("b" + RFC 4648 lowercase, no padding) -> its binary form, the log's leaf data.
export function cidToBytes(cid) {
  if (typeof cid !== "string" || cid[0] !== "b") throw new Error("expected a base32 CIDv1 (bafy…)");
  const alphabet = "abcdefghijklmnopqrstuvwxyz234567";
  const out = [];
  let bits = 0, value = 0;
  for (const ch of cid.slice(1)) {
    const v = alphabet.indexOf(ch);
    if (v < 0) throw new Error(`invalid base32 character ${JSON.stringify(ch)} in CID`);
    value = (value << 5) | v;
    bits += 5;
    if (bits >= 8) { bits -= 8; out.push((value >> bits) & 0xff); }
  }
  return Uint8Array.from(out);
}

// RFC 9162 §2.1.3.2, step by step. Returns {ok, reason}.
export async function verifyInclusion(leaf, index, size, proof, root) {
  if (!(Number.isInteger(index) && Number.isInteger(size) && index >= 0 && index < size)) {
    return { ok: false, reason: `leaf index ${index} is outside a tree of ${size} leaves` };
  }
  let fn = index, sn = size - 1, r = leaf;
  for (const p of proof) {
    if (sn === 0) return { ok: false, reason: "proof is longer than the tree is deep" };
    if (fn % 2 === 1 || fn === sn) {
      r = await nodeHash(p, r);
      if (fn % 2 === 0) {
        while (fn % 2 === 0 && fn !== 0) { fn = Math.floor(fn / 2); sn = Math.floor(sn / 2); }
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  if (sn !== 0) return { ok: false, reason: "proof is shorter than the tree is deep" };
  if (!equalBytes(r, root)) return { ok: false, reason: "proof does not lead to the signed root" };
  return { ok: true, reason: "proof leads to the signed root" };
}

async function getJSON(url) {
  const response = await fetch(url, { headers: { accept: "application/json" } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body?.error?.message || `${url}: HTTP ${response.status}`);
  return body;
}

// Is the record with this CID in the log at `base` (a node URL, "" for this one)? Fetches the signed
// head, the inclusion proof and the logged bytes, and checks both the proof and that the bytes hash
// to the CID. The head's signature itself is checked by `agora log verify-inclusion`, not here.
export async function verifyReceipt(cid, base = "") {
  const leafData = cidToBytes(cid);
  const head = await getJSON(`${base}/agora/v1/log/head`);
  const { size, root } = head.body;
  const answer = await getJSON(`${base}/agora/v1/log/proof/inclusion?cid=${encodeURIComponent(cid)}&size=${size}`);
  const proof = answer.proof.map(hexToBytes);
  const inclusion = await verifyInclusion(await leafHash(leafData), answer.index, size, proof, hexToBytes(root));
  const page = await getJSON(`${base}/agora/v1/log/entries?start=${answer.index}&end=${answer.index + 1}`);
  const entry = page.entries[0];
  // A sha2-256 CID ends with 0x12 0x20 and the 32-byte digest of the record's bytes.
  const digest = leafData.slice(-32);
  const multihash = leafData.slice(-34, -32);
  const bytesMatch = Boolean(entry) && entry.cid === cid && multihash[0] === 0x12 && multihash[1] === 0x20 &&
    equalBytes(await sha256(hexToBytes(entry.record)), digest);
  const ok = inclusion.ok && bytesMatch;
  const reason = !inclusion.ok ? inclusion.reason : !bytesMatch ? "the logged bytes do not hash to this CID" :
    `entry ${answer.index} of ${size}; proof of ${proof.length} hashes leads to the signed root; ` +
    "logged bytes hash to the CID";
  return { ok, reason, index: answer.index, size, root, log: head.signer, hash: hashImpl() };
}

// FIPS 180-4 SHA-256, for pages without WebCrypto.
const K = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);

export function sha256js(data) {
  const bitLen = data.length * 8;
  const padded = new Uint8Array(((data.length + 9 + 63) >> 6) << 6);
  padded.set(data);
  padded[data.length] = 0x80;
  const view = new DataView(padded.buffer);
  view.setUint32(padded.length - 8, Math.floor(bitLen / 2 ** 32));
  view.setUint32(padded.length - 4, bitLen >>> 0);
  const h = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  const w = new Uint32Array(64);
  const rotr = (x, n) => (x >>> n) | (x << (32 - n));
  for (let off = 0; off < padded.length; off += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getUint32(off + i * 4);
    for (let i = 16; i < 64; i++) {
      const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = (w[i - 16] + s0 + w[i - 7] + s1) >>> 0;
    }
    let [a, b, c, d, e, f, g, hh] = h;
    for (let i = 0; i < 64; i++) {
      const t1 = (hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i]) >>> 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      hh = g; g = f; f = e; e = (d + t1) >>> 0; d = c; c = b; b = a; a = (t1 + t2) >>> 0;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
  }
  const out = new Uint8Array(32);
  const outView = new DataView(out.buffer);
  h.forEach((x, i) => outView.setUint32(i * 4, x));
  return out;
}
