"""The base of every OpenAI request model (its own module so that protocol.py and the feature modules beside it,
protocol_tools.py and responses_protocol.py, share it without importing each other in a circle)."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict

logger = logging.getLogger("plm_serve.server.protocol")


class OpenAIBaseModel(BaseModel):
    """Accepts unknown fields (OpenAI adds some every few months) and logs which ones it ignored; validates
    known ones strictly (no type coercion, finite numbers only)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    def model_post_init(self, context: Any, /) -> None:
        if self.model_extra:
            logger.warning(
                "%s: the following fields were present in the request but ignored: %s",
                type(self).__name__,
                [name[:64] for name in sorted(self.model_extra)[:20]],
            )
