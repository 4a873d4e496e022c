"""Pre/post processors of ``flow_mlp``, found by LeRobot's factory by naming convention.

Pre: rename -> add batch dim -> device -> [task index] -> normalise (state, env state, action: MEAN_STD by
default). Post: unnormalise the action -> cpu. The model always sees normalised data. The task step exists
only for a multi-task policy (``task_vocabulary``): it turns each observation's ``task`` text into its
index in the vocabulary, saved with the step, so ``lerobot-eval`` rebuilds the same conditioning.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from lerobot.configs import PipelineFeatureType, PolicyFeature
from lerobot.lerobot_types import RobotObservation, TransitionKey
from lerobot.processor import (
    ObservationProcessorStep,
    PolicyAction,
    PolicyProcessorPipeline,
    ProcessorStepRegistry,
)
from lerobot.processor.factory import make_default_policy_processor_steps, make_policy_processor_pipelines

from .configuration_flow_mlp import OBS_TASK_INDEX, FlowMLPConfig


class UnknownTaskError(ValueError):
    """An observation's task is not in the policy's task vocabulary."""


@dataclass
@ProcessorStepRegistry.register(name="flow_mlp_task_index")
class TaskIndexProcessorStep(ObservationProcessorStep):
    """Adds ``observation.task_index`` (B,) int64: the index of each observation's ``task`` text in
    ``vocabulary``. An instruction outside the vocabulary raises UnknownTaskError naming it."""

    vocabulary: list[str] = field(default_factory=list)
    task_key: str = "task"

    def __post_init__(self):
        self._index = {task: i for i, task in enumerate(self.vocabulary)}

    def observation(self, observation: RobotObservation) -> RobotObservation:
        complementary = self.transition.get(TransitionKey.COMPLEMENTARY_DATA) or {}
        task = complementary.get(self.task_key)
        if task is None:
            raise UnknownTaskError(
                f"this multi-task flow_mlp needs each observation's {self.task_key!r} instruction; "
                "none was given"
            )
        tasks = [task] if isinstance(task, str) else list(task)
        unknown = [t for t in tasks if t not in self._index]
        if unknown:
            raise UnknownTaskError(
                f"task {unknown[0]!r} is not one this policy was trained on (its tasks: {self.vocabulary})"
            )
        device = next((v.device for v in observation.values() if isinstance(v, torch.Tensor)), None)
        index = torch.tensor([self._index[t] for t in tasks], dtype=torch.int64, device=device)  # (B,)
        return {**observation, OBS_TASK_INDEX: index}

    def get_config(self) -> dict[str, Any]:
        return {"vocabulary": list(self.vocabulary), "task_key": self.task_key}

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        # The index is an input of the model, not a feature the normaliser or an env knows of.
        return features


def make_flow_mlp_pre_post_processors(
    config: FlowMLPConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    """LeRobot's standard pipeline pair, with the task step for a multi-task policy; ``dataset_stats``
    feed the (un)normaliser steps."""
    steps = make_default_policy_processor_steps(config, dataset_stats, normalizer_device=config.device)
    task_steps = [TaskIndexProcessorStep(list(config.task_vocabulary))] if config.task_vocabulary else []
    return make_policy_processor_pipelines(
        input_steps=[
            steps.rename_observations,
            steps.add_batch_dim,
            steps.to_device,
            *task_steps,
            steps.normalize,
        ],
        output_steps=[steps.unnormalize, steps.to_cpu],
    )
