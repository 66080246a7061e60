"""Typed configuration: the single source of truth for every command.

A recipe (`recipes/*.yaml`) is a saved `RunConfig`. Values are resolved in this order, later wins:
field defaults < the YAML file < `--set dotted.key=value` overrides < typed command-line flags.
Every field's description is the documentation of that key (`llmkit config show` prints it resolved).
"""

from __future__ import annotations

from llmkit.config.recipes import (
    MAX_RECIPE_VALUES,
    REFERENCE_HEADER,
    SECRET_NAME,
    apply_override,
    build_config,
    describe_keys,
    dump_config,
    input_paths,
    load_config,
    read_json_mapping,
    read_yaml,
    yaml_path,
)
from llmkit.config.schema import (
    MAX_MIX_EPOCHS,
    READS,
    AugmentConfig,
    CheckpointConfig,
    DataConfig,
    DecontaminateConfig,
    DistillConfig,
    DistributedConfig,
    FinetuneConfig,
    GrpoConfig,
    LoggingConfig,
    LoraConfig,
    ModelConfig,
    NearDedupConfig,
    OptimizerConfig,
    PrecisionConfig,
    PreferenceConfig,
    QualityConfig,
    RunConfig,
    ScheduleConfig,
    Section,
    TrainConfig,
)

__all__ = [
    "AugmentConfig",
    "CheckpointConfig",
    "DataConfig",
    "DecontaminateConfig",
    "DistillConfig",
    "DistributedConfig",
    "FinetuneConfig",
    "GrpoConfig",
    "LoggingConfig",
    "LoraConfig",
    "MAX_MIX_EPOCHS",
    "MAX_RECIPE_VALUES",
    "ModelConfig",
    "NearDedupConfig",
    "OptimizerConfig",
    "PrecisionConfig",
    "PreferenceConfig",
    "QualityConfig",
    "READS",
    "REFERENCE_HEADER",
    "RunConfig",
    "SECRET_NAME",
    "ScheduleConfig",
    "Section",
    "TrainConfig",
    "apply_override",
    "build_config",
    "describe_keys",
    "dump_config",
    "input_paths",
    "load_config",
    "read_json_mapping",
    "read_yaml",
    "yaml_path",
]
