"""Training of the demo model pair (tokenizer + oracle + draft) from code already on the machine.

Stages, one module each: ``corpus`` (stdlib + installed dependencies' Python source,
deduplicated, deterministic held-out split), ``tokenizer`` (byte-level BPE),
``train_oracle`` (LlamaForCausalLM from scratch), ``distill`` (draft distilled on the
oracle's own continuations), ``evaluate`` (acceptance and CPU timing), ``card`` (model
card and metrics), ``pipeline`` (the stages in order) and ``cli`` (argparse front end).

Only torch, transformers, tokenizers, safetensors and the standard library are imported
here (never grpc or opentelemetry), so the package runs from a bare source checkout on a
GPU machine with ``python -m specdec.training``.
"""
