"""circuit-tracer's side of `scripts/bench_trace.py --compare-circuit-tracer` (issue 18).

Runs in the separate environment built by `scripts/setup_circuit_tracer_env.sh` (circuit-tracer,
torch, transformers 4.x, TransformerLens); it imports nothing of cltrace, which is not installed
there. The inputs are what bench_trace's preparation step writes from cltrace's own weights:

  --model DIR        a Hugging Face Llama checkpoint (config.json, model.safetensors,
                     tokenizer.json, tokenizer_config.json): SmolLM2-135M as cltrace loads it
  --transcoder DIR   the transcoder in circuit-tracer's layout (`cltrace export`)
  --prompt FILE      JSON {"ids": [...]}: the prompt's token ids, BOS not included

It loads the model the way `ReplacementModel.from_pretrained` does (TransformerLens backend,
fold_ln / centering off, lazy decoders), with two changes forced by working offline from a local
directory: the transcoders are read with circuit-tracer's own loaders from the local files
(`load_clt` / `load_transcoder_set`; `load_transcoder_from_hub` only reads hub repos), and the
model is built by `TransformerLensReplacementModel.from_pretrained_and_transcoders(local_dir,
hf_model=..., tokenizer=...)`. TransformerLens 3.x's `HookedTransformer.from_pretrained` refuses
any name outside its list of official models (SmolLM2 is not in it) although its config and
weight loaders read local directories, and its generic Llama config ignores `rope_theta`
(`rotary_base` stays 10,000; SmolLM2 uses 100,000): `_local_llama` patches both, for the
duration of the load only.

Modes:
  (default)      attribute(prompt, model, batch_size, max_feature_nodes) and
                 compute_graph_scores(graph); prints `RESULT {json}` (seconds, node counts,
                 scores). `--save FILE.npz` also writes the graph's nodes and dense adjacency.
  --check FILE   logits of the Hugging Face model and of the TransformerLens replacement model on
                 the prompt (BOS prepended) against FILE (.npy, [pos, vocab]: cltrace's logits);
                 prints `RESULT {json}` with the largest absolute differences.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from contextlib import contextmanager
from pathlib import Path

T_START = time.perf_counter()


@contextmanager
def _local_llama(rope_theta: float):
    """Let `HookedTransformer.from_pretrained` take a local Llama directory (module docstring):
    a path passes its official-name check (its loaders already read local paths), and the
    config gets the checkpoint's RoPE base."""
    import transformer_lens.loading_from_pretrained as tl_loading

    name, config = tl_loading.get_official_model_name, tl_loading.get_pretrained_model_config

    def official(model_name: str) -> str:
        return model_name if Path(model_name).is_dir() else name(model_name)

    def with_rope_theta(*args, **kwargs):
        cfg = config(*args, **kwargs)
        cfg.rotary_base = rope_theta
        return cfg

    tl_loading.get_official_model_name = official
    tl_loading.get_pretrained_model_config = with_rope_theta
    try:
        yield
    finally:
        tl_loading.get_official_model_name, tl_loading.get_pretrained_model_config = name, config


def load_model(model_dir: Path, transcoder_dir: Path, n_ctx: int | None = None):
    import torch
    import yaml
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from transformers import AutoTokenizer, LlamaForCausalLM

    meta = yaml.safe_load((transcoder_dir / "config.yaml").read_text())
    common = {"scan": str(transcoder_dir), "feature_input_hook": meta["feature_input_hook"],
              "feature_output_hook": meta["feature_output_hook"],
              "device": torch.device("cpu"), "dtype": torch.float32,
              # as ReplacementModel.from_pretrained loads hub transcoders
              "lazy_encoder": False, "lazy_decoder": True}
    if meta["model_kind"] == "cross_layer_transcoder":
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

        transcoders = load_clt(str(transcoder_dir), **common)
    else:
        from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

        n = len(list(transcoder_dir.glob("layer_*.safetensors")))
        transcoders = load_transcoder_set(
            {i: str(transcoder_dir / f"layer_{i}.safetensors") for i in range(n)}, **common)

    hf_model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with _local_llama(hf_model.config.rope_theta):
        model = TransformerLensReplacementModel.from_pretrained_and_transcoders(
            str(model_dir), transcoders, hf_model=hf_model, tokenizer=tokenizer,
            device=torch.device("cpu"), dtype=torch.float32,
            **({} if n_ctx is None else {"n_ctx": n_ctx}))
    return hf_model, model


def check(args, hf_model, model, ids: list[int]) -> dict:
    """Largest |logit difference| of the HF and TransformerLens models against cltrace's."""
    import numpy as np
    import torch

    want = np.load(args.check)
    tokens = model.ensure_tokenized(ids)
    with torch.no_grad():
        hf = hf_model(tokens[None]).logits[0].numpy()
        tl = model(tokens[None]).detach()[0].numpy()
    scale = float(np.abs(want).max())
    return {"tokens": tokens.tolist(), "logit_scale": round(scale, 3),
            "hf_max_abs_diff": float(np.abs(hf - want).max()),
            "tl_max_abs_diff": float(np.abs(tl - want).max()),
            "hf_vs_tl_max_abs_diff": float(np.abs(hf - tl).max()),
            "same_argmax": bool((hf.argmax(-1) == want.argmax(-1)).all()
                                and (tl.argmax(-1) == want.argmax(-1)).all())}


def trace(args, model, ids: list[int]) -> dict:
    import torch
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores

    t0 = time.perf_counter()
    graph = attribute(ids, model, batch_size=args.batch_size,
                      max_feature_nodes=args.max_feature_nodes)
    t1 = time.perf_counter()
    replacement, completeness = compute_graph_scores(graph)
    t2 = time.perf_counter()
    sel = graph.active_features[graph.selected_features]
    out = {"n_active": len(graph.active_features), "n_features": len(sel),
           "n_nodes": int(graph.adjacency_matrix.shape[0]),
           "replacement": float(replacement), "completeness": float(completeness),
           "seconds_attribute": round(t1 - t0, 2), "seconds_scores": round(t2 - t1, 2)}
    t3 = time.perf_counter()
    if args.save:  # for the agreement check; bench_trace takes its time out of the run's
        import numpy as np

        L, T = model.cfg.n_layers, len(graph.input_tokens)
        layer, pos = torch.meshgrid(torch.arange(L), torch.arange(T), indexing="ij")
        np.savez(args.save, feature_layer=sel[:, 0].numpy(), feature_pos=sel[:, 1].numpy(),
                 feature_index=sel[:, 2].numpy(), error_layer=layer.ravel().numpy(),
                 error_pos=pos.ravel().numpy(), tokens=graph.input_tokens.cpu().numpy(),
                 logit_tokens=graph.logit_token_ids.numpy(),
                 logit_probs=graph.logit_probabilities.numpy(),
                 adjacency=graph.adjacency_matrix.numpy(),
                 scores=np.array([replacement, completeness]))
    return out | {"seconds_save": round(time.perf_counter() - t3, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--transcoder", type=Path, required=True)
    ap.add_argument("--prompt", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--max-feature-nodes", type=int, default=None)
    ap.add_argument("--n-ctx", type=int, default=None,
                    help="TransformerLens context length (default: the checkpoint's, 8,192 for "
                    "SmolLM2; each layer holds an n_ctx^2 causal mask)")
    ap.add_argument("--save", default=None, help="write the graph here (.npz)")
    ap.add_argument("--check", default=None, help="cltrace's logits (.npy): compare, no trace")
    args = ap.parse_args()
    ids = json.loads(args.prompt.read_text())["ids"]
    t0 = time.perf_counter()
    hf_model, model = load_model(args.model, args.transcoder, args.n_ctx)
    row = {"seconds_load": round(time.perf_counter() - t0, 2)}  # imports included
    if args.check:
        row |= check(args, hf_model, model, ids)
    else:
        del hf_model  # TransformerLens holds its own copy of the weights
        row |= trace(args, model, ids)
    row["seconds_in_process"] = round(time.perf_counter() - T_START, 2)
    row["peak_rss_gb_self"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print("RESULT " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
