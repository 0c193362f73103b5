"""Media: the upload reply, the media config, and ``m.image`` / ``m.file`` message content."""

from __future__ import annotations

from typing import Any

import attrs
import cattrs
from cattrs.gen import override

from bridge_kit.types.converter import keep_unknown_keys


@attrs.frozen
class UploadResponse:
    """The reply of ``POST /_matrix/media/v3/upload``."""

    content_uri: str


@attrs.frozen
class MediaConfig:
    """The reply of ``GET /_matrix/client/v1/media/config``; ``upload_size`` is ``m.upload.size``.

    ``upload_size`` is ``None`` when the homeserver states no limit.
    """

    upload_size: int | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class MediaInfo:
    """``info`` of a media message: MIME type, size in bytes, and for images ``w``/``h`` in px."""

    mimetype: str | None = None
    size: int | None = None
    w: int | None = None
    h: int | None = None
    duration: int | None = None
    thumbnail_url: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class MediaMessage:
    """The content of an ``m.room.message`` carrying media (``m.image``, ``m.file``...).

    ``body`` is the caption or file name; ``filename`` the original file name
    when ``body`` is a caption; ``url`` the ``mxc://`` URI.
    """

    body: str
    msgtype: str
    url: str
    info: MediaInfo | None = None
    filename: str | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)


def configure_converter(converter: cattrs.Converter) -> None:
    """Register the hooks of this module's models on ``converter``."""
    keep_unknown_keys(converter, MediaConfig, upload_size=override(rename="m.upload.size"))
    keep_unknown_keys(converter, MediaInfo, omit_if_default=True)
    keep_unknown_keys(converter, MediaMessage, omit_if_default=True)
