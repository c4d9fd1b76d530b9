"""kombu's file-based transport, with writes that a reader can never see half done.

The stock transport creates a message file and then writes into it, while readers move any
file they list: a reader can take an empty message, which stops a Celery consumer. Here a
message is written under a temporary name and renamed into place (an atomic rename). Used only
by the demo's no-server fallback, as ``COUPONS_BROKER_URL=cwfile://``
(see :func:`coupon_devtools.filebroker.register`).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from time import monotonic
from typing import Any

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = Path(self.data_folder_out) / name
        partial = final.with_name(final.name + ".part")  # readers take only "*.<queue>.msg"
        partial.write_bytes(str_to_bytes(dumps(message)))
        partial.replace(final)


class Transport(filesystem.Transport):
    Channel = Channel
