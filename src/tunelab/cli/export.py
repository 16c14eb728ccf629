"""`tunelab export --model models/merged --format gguf [--quant f16|q8_0|f32] --output models/merged.gguf`

Writes the GGUF file and an Ollama `Modelfile` beside it, and verifies both (see tunelab.export.gguf).
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="merged model folder (tunelab merge writes one)")
    p.add_argument("--format", choices=["gguf"], default="gguf", help="output format (gguf: llama.cpp, Ollama)")
    p.add_argument("--quant", choices=["f16", "q8_0", "f32"], default="f16",
                   help="weight type of the matrices (f32: for weights beyond float16's range; twice f16's size)")
    p.add_argument("--output", required=True, help="the .gguf file to write (the Modelfile goes beside it; "
                   "NAME.Modelfile when the folder's Modelfile is another GGUF's)")
    p.add_argument("--no-modelfile", dest="modelfile", action="store_false", help="do not write an Ollama Modelfile")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip reading the file back")


def run(args: argparse.Namespace) -> int:
    import logging

    from tunelab.export.gguf import export_gguf

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = export_gguf(args.model, args.output, quant=args.quant, modelfile=args.modelfile, verify=args.verify)
    print(report.summary())
    return 0
