"""FlowAdapter for LeRobot's pi05: pi0's architecture with the state moved into the language prompt
(discretised by the preprocessor) and the timestep fed to the expert through adaptive RMSNorm."""

from __future__ import annotations

from torch import Tensor

from lerobot_pirl.adapters.pi0 import PaliGemmaPrefix, PI0Adapter


class PI05Adapter(PI0Adapter):
    """Drives a ``PI05Policy`` step by step. Options: see :class:`VLAFlowAdapter`."""

    def _state(self, batch: dict[str, Tensor]) -> None:
        return None  # already tokenised into the prompt by Pi05PrepareStateTokenizerProcessorStep

    def _denoise(self, data: PaliGemmaPrefix, x_t: Tensor, t: Tensor) -> Tensor:
        return self.policy.model.denoise_step(
            prefix_pad_masks=data.prefix_pad_masks,
            past_key_values=data.past_key_values,
            x_t=x_t,
            timestep=t,
        )
