"""What a LoRA folder holds, as one dict: make_lora_fixtures.py records it for the files diffusers and peft loaded,
and tests/test_lora.py compares what tinybooth writes today with that record (both import this one function)."""
import json

from safetensors import safe_open


def file_record(d):
    """Keys and metadata of every safetensors file in the folder d (a Path), and its JSON files' contents."""
    rec = {}
    for f in sorted(d.rglob("*")):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as s:
                rec[str(f.relative_to(d))] = {"keys": sorted(s.keys()), "metadata": s.metadata()}
        elif f.suffix == ".json":
            rec[str(f.relative_to(d))] = json.loads(f.read_text())
    return rec
