"""Parameter-efficient fine-tuning on effopt models: LoRA / QLoRA (peft layers over dense, masked,
effopt-packed and bitsandbytes 4-bit bases), LoftQ initialisation, bottleneck adapters, prompt and
prefix tuning (peft), and the adapter folders they export."""

from effopt.methods.peft.adapter_io import load_adapter, save_adapter  # noqa: F401
