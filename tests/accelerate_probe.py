"""Run by `accelerate launch --config_file FILE tests/accelerate_probe.py`: each process prints, as one JSON line,
the accelerate state FILE gave it and the FSDP or DeepSpeed plugin built from FILE's fields (an FSDP plugin's layer
class to wrap resolved in a converted SEA Llama, as the Trainer resolves it)."""

import json
import os

from accelerate import PartialState
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin


def plugin_fields() -> dict:
    if os.environ.get("ACCELERATE_USE_FSDP") == "true":
        from conftest import dense_test_model
        from conversion.convert import convert_to_sea

        plugin = FullyShardedDataParallelPlugin()
        plugin.set_auto_wrap_policy(convert_to_sea(dense_test_model("llama")))
        return {"fsdp_version": plugin.fsdp_version, "wraps": sorted(plugin.transformer_cls_names_to_wrap),
                "reshard_after_forward": plugin.reshard_after_forward,
                "state_dict_type": plugin.state_dict_type.name}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        plugin = DeepSpeedPlugin()
        return {"zero_stage": plugin.zero_stage, "deepspeed_config": plugin.deepspeed_config}
    return {}


state = PartialState(cpu=True)  # no GPU here: the processes join one gloo group, as distill.py makes them
line = json.dumps({"rank": state.process_index, "processes": state.num_processes, "backend": state.backend,
                   "mixed_precision": os.environ.get("ACCELERATE_MIXED_PRECISION"), **plugin_fields()})
# One write call per line: both processes share the pipe, and print's separate writes of text and newline interleave.
os.write(1, (line + "\n").encode())
