"""Multi-LoRA: adapters read from PEFT directories (``adapter``), the slots a step's adapters sit
in (``slots``), their batched terms on the model's projections (``layers.apply_lora``), the
runner that tells each step which row uses which adapter (``runner``) and the registry of named
adapters an engine serves (``registry``). docs/engine.md ("LoRA adapters") has the whole picture."""
