"""Train `agora-tiny`, Agora's bundled byte-level Llama, on the CPython standard library.

No weights can be downloaded where Agora is built and tested, so the project trains its own
tiny model from source every Python install carries. Reproduce with:

    python scripts/train_agora_tiny.py --out src/agoranet/models/agora-tiny

Seeded (torch, data order); results depend on the Python version whose stdlib is read and on
torch's CPU kernels, both recorded in `training.json` next to the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sysconfig
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Byte-level vocabulary: ids 0..255 are bytes; specials follow. Kept in sync with
# agoranet.engine's tokenizer, which reads them back from tokenizer.json.
BOS, EOS, PAD, SEP = 256, 257, 258, 259
VOCAB = 260


def stdlib_corpus(holdout_every: int = 20) -> tuple[bytes, bytes]:
    """Return (train, held-out) bytes: every stdlib .py file outside tests, split by path hash."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "/test" in rel or rel.startswith("test") or "idle_test" in rel:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % holdout_every
        (held if bucket == 0 else train).append(data)
    return b"\n".join(train), b"\n".join(held)


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    """Random windows of seq bytes, each prefixed with BOS."""
    while True:
        starts = torch.randint(0, len(data) - seq, (batch,), generator=gen)
        x = torch.stack([data[s : s + seq] for s in starts.tolist()])
        yield torch.cat([torch.full((batch, 1), BOS, dtype=torch.long), x], dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("src/agoranet/models/agora-tiny"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=20261125)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_bytes, held_bytes = stdlib_corpus()
    train = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).long()
    held = torch.frombuffer(bytearray(held_bytes), dtype=torch.uint8).long()
    print(f"corpus: {len(train_bytes)/1e6:.1f} MB train, {len(held_bytes)/1e6:.1f} MB held out")

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params/1e6:.2f} M")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    gen = torch.Generator().manual_seed(args.seed)
    stream = batches(train, args.batch, args.seq, gen)
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        x = next(stream)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item()/math.log(2):.3f} bits/byte  {time.time()-t0:.0f}s", flush=True)

    model.eval()
    held_gen = torch.Generator().manual_seed(args.seed + 1)
    held_stream = batches(held, args.batch, args.seq, held_gen)
    with torch.no_grad():
        held_loss = sum(model(input_ids=(x := next(held_stream)), labels=x).loss.item() for _ in range(16)) / 16
    held_bits = held_loss / math.log(2)
    print(f"held-out loss {held_bits:.3f} bits/byte after {time.time()-t0:.0f}s")

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    (args.out / "tokenizer.json").write_text(json.dumps({
        "type": "agora-bytes",
        "vocab_size": VOCAB,
        "specials": {"<|bos|>": BOS, "<|eos|>": EOS, "<|pad|>": PAD, "<|sep|>": SEP},
    }, indent=2) + "\n")
    (args.out / "training.json").write_text(json.dumps({
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
        "parameters": n_params, "held_out_bits_per_byte": round(held_bits, 4),
        "train_seconds": round(time.time() - t0, 1), "python": platform.python_version(),
        "torch": torch.__version__, "corpus_bytes": len(train_bytes), "stored_dtype": "float16",
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
