"""Convert a pretrained dense model of a family in `sea.configuration_sea.SEA_FAMILIES` (OPT, Llama, Qwen2, Qwen3 or
Mistral causal LMs, BERT encoders) into a SEA model.

Every dense weight is copied; the new SEA parameters are initialised so that, with a key budget covering every
key, the SEA model computes exactly what the dense model computes (its gates start neutral).

    python conversion/convert.py --model PATH_OR_HUB_ID --output-dir DIR [--gguf-file NAME] [--dtype bfloat16]
        [--key-budget 64 ...]
"""

import argparse
import inspect
import os
import typing
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch
import transformers
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from sea.configuration_sea import SEA_FAMILIES, SEA_FIELD_RULES, SeaConfigMixin, SeaFamily
from sea.modeling_sea import converted_class

SUPPORTED = ", ".join(f"{model_type!r} ({family.dense_class})" for model_type, family in SEA_FAMILIES.items())
# Config entries that describe the dense checkpoint itself rather than the architecture.
NOT_INHERITED = (
    "model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype", "quantization_config",
)
# --dtype: "auto" is from_pretrained's own rule, the checkpoint's `dtype` (`torch_dtype`) from its config, else the
# dtype its weights are stored in; a GGUF file of quantised blocks (SmolLM2's Q4_1) has neither and is dequantised
# to float32.
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The command-line flag of every SEA config field: its name without `sea_` (`sea_key_budget` -> --key-budget), but
# --sea-baseline, since distill.py's --baseline already switches its kernel-attention comparison run on and off.
SEA_FLAGS = {field.name: "--" + field.name.removeprefix("sea_").replace("_", "-") for field in fields(SeaConfigMixin)}
SEA_FLAGS["sea_baseline"] = "--sea-baseline"


def family_of(model_type: str) -> SeaFamily:
    """The family of a dense checkpoint's `model_type`; a `ValueError` naming the supported ones for any other."""
    if model_type not in SEA_FAMILIES:
        raise ValueError(f"Cannot convert a model of type {model_type!r} to SEA: supported types are {SUPPORTED}.")
    return SEA_FAMILIES[model_type]


def dense_family(config) -> SeaFamily:
    """The family of a dense model's config; a `ValueError` for an unsupported type, or for a SEA model's config
    (which carries its dense family's `model_type`, and keeps its SEA fields when read without the remote code)."""
    if isinstance(config, SeaConfigMixin) or "sea_key_budget" in config.to_dict():
        raise ValueError(
            "This is already a SEA model (its config has SEA fields such as sea_key_budget): convert or distil the "
            "dense model it was made from."
        )
    return family_of(config.model_type)


def load_dense(
    model: str | os.PathLike, num_labels: int | None = None, gguf_file: str | None = None,
    dtype: torch.dtype | str = "auto",
) -> PreTrainedModel:
    """Load the dense checkpoint with the class SEA mirrors (a BERT encoder gets a fresh classification head).
    `gguf_file` names a GGUF file inside `model` (quantised weights are dequantised to float32 by transformers).
    `dtype` is from_pretrained's: "auto" keeps the checkpoint's own (see DTYPES)."""
    gguf = {} if gguf_file is None else {"gguf_file": gguf_file}
    config = AutoConfig.from_pretrained(model, **gguf)
    family = dense_family(config)
    extra = {} if num_labels is None or family.causal else {"num_labels": num_labels}
    return getattr(transformers, family.auto_class).from_pretrained(model, dtype=dtype, **extra, **gguf)


def sea_config_for(dense_config, **sea_options):
    fields = {k: v for k, v in dense_config.to_dict().items() if k not in NOT_INHERITED}
    fields.update({k: v for k, v in sea_options.items() if v is not None})
    return dense_family(dense_config).config_class(**fields)


def convert_to_sea(
    dense: PreTrainedModel | str | os.PathLike, num_labels: int | None = None, gguf_file: str | None = None,
    dtype: torch.dtype | str = "auto", **sea_options,
):
    """Return the SEA model of `dense` (a model object, or a path / Hub id to load, optionally a GGUF file in it).

    `sea_options` are `SeaConfigMixin` fields (`sea_key_budget=...`); None keeps the default.
    `num_labels` sets the size of a fresh BERT classification head when the checkpoint has none.
    `dtype` is the SEA model's; "auto" keeps the dense model's (for a path, the checkpoint's own: see DTYPES).
    """
    if not isinstance(dense, PreTrainedModel):
        # A quantised GGUF file is dequantised to float32 whatever dtype is asked (another one only adds a warning
        # about its packed-weight kernels): it is cast below, as the SEA model is built.
        dense = load_dense(dense, num_labels, gguf_file, "auto" if gguf_file else dtype)
    family = dense_family(dense.config)
    sea_class = converted_class(family)
    config = sea_config_for(dense.config, **sea_options)
    if num_labels is not None and not family.causal:
        config.num_labels = num_labels
    sea = sea_class(config).to(device=dense.device, dtype=dense.dtype if dtype == "auto" else dtype)
    whole_model = type(dense).__name__ == family.dense_class
    target, source = (sea, dense) if whole_model else (sea.base_model, dense.base_model)
    missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"Weights of {type(dense).__name__} with no place in {sea_class.__name__}: {unexpected}")
    not_sea = [name for name in missing if ".sea." not in name and not name.startswith("sea.")]
    if not_sea and whole_model:
        raise ValueError(f"{type(dense).__name__} lacks weights that {sea_class.__name__} needs: {not_sea}")
    sea.eval()
    return sea


def sea_options_problem(dense_config, sea_options: dict) -> str | None:
    """Why `sea_options` cannot make a SEA config of `dense_config`, each field named by the command-line flag that
    sets it (`sea_key_budget` -> --key-budget), or None: checked before any weights load."""
    try:
        sea_config_for(dense_config, **sea_options)
    except ValueError as error:
        message = str(error)
        for name in sea_options:
            message = message.replace(f"`{name}`", SEA_FLAGS[name])
        return message
    return None


def model_path_problem(model: str, gguf_file: str | None = None) -> str | None:
    """Why `--model` (and `--gguf-file`) cannot be what the user meant, judged without the Hub, or None. A folder
    that exists is local; a missing one that reads as a Hub id (`name` or `namespace/name`) is left to the Hub;
    any other missing path (`./x`, `/x`, `~/x`, `a/b/c`) is a mistake that the Hub would only answer slowly."""
    path = Path(model)
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            return f"--gguf-file {gguf_file}: no such file in {model}"
        return None
    if path.exists():
        return f"--model {model} is a file: pass the folder that holds it (a GGUF file's name goes to --gguf-file)"
    try:
        validate_repo_id(model)
    except HFValidationError:
        return f"--model {model}: no such folder (nor a Hub id, which reads name or namespace/name)"
    return None


def apply_umask(folder: Path):
    """Give `folder` and everything in it the modes a plain mkdir and open give (mkdtemp makes the folder 0700 and
    safetensors writes its files 0600), so the saved model is as readable as the user's other files."""
    umask = os.umask(0)  # the portable way to read it: set, then straight back
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_atomically(
    model: PreTrainedModel, output_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
    populate: Callable[[Path], None] | None = None,
):
    """Write `model` (and tokenizer, and whatever `populate(folder)` adds) to `output_dir` via a temporary sibling
    folder renamed into place, so a killed run never leaves a half-written model behind."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass --overwrite-output-dir to replace it.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if populate is not None:
            populate(staging)
        apply_umask(staging)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def sea_field_descriptions() -> dict[str, str]:
    """Each SEA field's description in `SeaConfigMixin`'s docstring, joined into one line."""
    descriptions, name = {}, None
    for line in inspect.cleandoc(SeaConfigMixin.__doc__).splitlines():
        if line.startswith("sea_"):  # `sea_key_budget (`int`, defaults to 64):`, its description indented below
            name = line.split()[0]
            descriptions[name] = []
        elif name is not None and line.strip():
            descriptions[name].append(line.strip())
    return {name: " ".join(lines) for name, lines in descriptions.items()}


def value_type(field) -> type:
    """The type a field's values have on the command line: its annotation, less the None of an optional one."""
    return next(kind for kind in typing.get_args(field.type) or (field.type,) if kind is not type(None))


def add_sea_arguments(parser: argparse.ArgumentParser):
    """A flag for every SEA config field (SEA_FLAGS, also spelled with underscores as HfArgumentParser spells its
    own), with the config's default, its docstring's description and the choices of its rule in SEA_FIELD_RULES:
    the SEA options of both the conversion and the distillation command lines."""
    group = parser.add_argument_group("SEA attention (the config's sea_* fields)")
    descriptions = sea_field_descriptions()
    for field in fields(SeaConfigMixin):
        flag = SEA_FLAGS[field.name]
        names = dict.fromkeys([flag, "--" + flag.removeprefix("--").replace("-", "_")])
        # argparse formats help strings with %: a literal one in a description must be doubled.
        help = descriptions[field.name].replace("%", "%%") + " (default: %(default)s)"
        kind = value_type(field)
        if kind is bool:
            action = argparse.BooleanOptionalAction
            group.add_argument(*names, dest=field.name, action=action, default=field.default, help=help)
            continue
        choices = SEA_FIELD_RULES[field.name].choices
        if choices is not None:
            choices = [choice for choice in choices if choice is not None]  # None (a default) is no word to type
        group.add_argument(*names, dest=field.name, type=kind, choices=choices, default=field.default, help=help)


def sea_options_from(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in SEA_FLAGS}


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Refuse, naming the flag, what would otherwise fail only after the dense model's slow load: a missing
    path, a config that cannot be read or converted, SEA options it refuses, an output folder in the way."""
    if Path(args.output_dir).exists() and not args.overwrite_output_dir:
        parser.error(f"{args.output_dir} already exists; pass --overwrite-output-dir to replace it.")
    problem = model_path_problem(args.model, args.gguf_file)
    if problem is not None:
        parser.error(problem)
    try:
        config = AutoConfig.from_pretrained(args.model, **({"gguf_file": args.gguf_file} if args.gguf_file else {}))
    except (OSError, ValueError) as error:  # no config.json, or one transformers cannot read
        parser.error(f"--model {args.model}: cannot load its config ({error})")
    problem = sea_options_problem(config, sea_options_from(args))
    if problem is not None:
        parser.error(problem)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=f"local path or Hub id of a dense model: {SUPPORTED}")
    parser.add_argument("--gguf-file", help="a GGUF file inside --model to load the dense weights from")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto",
        help="dtype of the saved SEA weights (default auto: the checkpoint's own, from its config or else its "
             "weights; float32 for a GGUF file, which transformers dequantises)",
    )
    parser.add_argument("--output-dir", required=True, help="folder to write the SEA model to")
    parser.add_argument("--num-labels", type=int, help="labels of a fresh BERT classification head")
    parser.add_argument("--overwrite-output-dir", action="store_true", help="replace an existing output folder")
    add_sea_arguments(parser)
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    sea = convert_to_sea(
        args.model, num_labels=args.num_labels, gguf_file=args.gguf_file, dtype=DTYPES[args.dtype],
        **sea_options_from(args),
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, **({"gguf_file": args.gguf_file} if args.gguf_file else {}))
    except (OSError, ValueError):
        tokenizer = None  # a checkpoint without tokenizer files converts all the same
    path = save_atomically(sea, args.output_dir, tokenizer, overwrite=args.overwrite_output_dir)
    trainable = sum(p.numel() for n, p in sea.named_parameters() if ".sea." in n)
    print(f"Wrote {type(sea).__name__} to {path} ({trainable:,} new SEA parameters).")


if __name__ == "__main__":
    main()
