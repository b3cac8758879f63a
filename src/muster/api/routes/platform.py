"""ECE's platform API: GET /platform (the version and the region's summary)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from muster import __version__
from muster.api.auth import platform_of, require_user
from muster.api.routes import errors
from muster.api.schemas_infra import PlatformInfo
from muster.domain.summary import platform_info
from muster.domain.users import Principal

router = APIRouter(tags=["Platform"])


@router.get(
    "/platform",
    operation_id="get-platform",
    response_model=PlatformInfo,
    responses=errors(401, 429),
)
def get_platform(request: Request, _principal: Principal = Depends(require_user)) -> PlatformInfo:
    return PlatformInfo.model_validate(platform_info(platform_of(request), version=__version__))
