"""One APIRouter per resource, all under /v1."""
