"""An Ollama Modelfile beside a GGUF: FROM, the chat template in Ollama's Go-template syntax, stop tokens.

Ollama's TEMPLATE is a Go template, not the Jinja template the tokenizer carries, and no general translation
exists; the chat formats below are recognised by their markers and written in Ollama's syntax. For any other
template the Modelfile leaves TEMPLATE out, and Ollama takes the chat template stored in the GGUF itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChatFormat:
    marker: str               # a string only this format's Jinja template contains
    template: str             # the same format as an Ollama Go template
    stops: tuple[str, ...]


CHAT_FORMATS = (
    ChatFormat("<|im_start|>",
               "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n",
               ("<|im_start|>", "<|im_end|>")),
    ChatFormat("<|start_header_id|>",
               "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ChatFormat("[INST]",
               "{{- range .Messages }}{{- if eq .Role \"user\" }}[INST] {{ .Content }} [/INST]"
               "{{- else if eq .Role \"assistant\" }} {{ .Content }}</s>{{ end }}{{ end }}",
               ("[INST]", "[/INST]")),
)

MODELFILE = "Modelfile"


def modelfile_text(tokenizer, gguf_name: str) -> str:
    lines = [f"FROM ./{gguf_name}"]
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    chat = next((f for f in CHAT_FORMATS if isinstance(template, str) and f.marker in template), None)
    if chat is not None:
        lines.append(f'TEMPLATE """{chat.template}"""')
    else:
        lines.append("# no TEMPLATE: Ollama uses the chat template stored in the GGUF file")
    stops = list(chat.stops if chat is not None else ())
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(folder: Path, tokenizer, gguf_name: str) -> Path:
    path = folder / MODELFILE
    path.write_text(modelfile_text(tokenizer, gguf_name))
    return path
