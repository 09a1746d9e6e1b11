"""OpenAI's Files and Vector Stores routes, for a tenant's own key: upload a document, put it in a vector store (it
is chunked and embedded off the request path), list, read, delete, and search a store by meaning.

Every id is looked up with the caller's tenant: another tenant's file or store is a 404, as an unknown one is.
Uploads are ``multipart/form-data`` as OpenAI's SDKs send them (``file`` and ``purpose``); text, Markdown, HTML and
PDF files are read.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
from typing import TYPE_CHECKING, Annotated, Literal, Union

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import (Field, StrictBool, StrictFloat, StrictInt, StringConstraints, WithJsonSchema, field_validator,
                      model_validator)

from gateway.api.ops import error_responses
from gateway.api.shared import USAGE_ERRORS, list_page
from gateway.api.guard import stateless_gateway
from gateway.config.schema import TEXT_PATTERN, Strict
from gateway.errors import GatewayError
from gateway.finetune import datasets
from gateway.pipeline.auth import identify
from gateway.retrieval import documents
from gateway.retrieval.catalog import Page, link_view

if TYPE_CHECKING:
    from gateway.api.services import GatewayServices

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_RESULTS = 50
ORDER = Query("desc", pattern="^(asc|desc)$", description="by creation: desc (newest first, OpenAI's default) or asc")
# OpenAI's limits on metadata: 16 pairs, keys of 64 characters, values of 512 (and no NUL, for jsonb)
Metadata = Annotated[
    dict[Annotated[str, StringConstraints(max_length=64, pattern=TEXT_PATTERN)],
         Annotated[str, StringConstraints(max_length=512, pattern=TEXT_PATTERN)]],
    Field(max_length=16),
    WithJsonSchema({"type": "object", "maxProperties": 16, "propertyNames": {"maxLength": 64, "pattern": TEXT_PATTERN},
                    "additionalProperties": {"type": "string", "maxLength": 512, "pattern": TEXT_PATTERN}})]


# A file's attributes in a store, as OpenAI takes them: 16 pairs, values a string (512), a number or a boolean
Key = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=TEXT_PATTERN)]
Value = Union[StrictBool, Annotated[StrictInt, Field(ge=-2**53, le=2**53)],
              Annotated[StrictFloat, Field(ge=-2**53, le=2**53)],  # what a JavaScript client reads back exactly
              Annotated[str, StringConstraints(max_length=512, pattern=TEXT_PATTERN)]]
Attributes = Annotated[dict[Key, Value], Field(max_length=16)]
MAX_FILTER_DEPTH = 8


class ChunkingStrategy(Strict):
    """Chunks of 160 words overlapping by 30 ("auto"); a static size of one's own is not served."""

    type: Literal["auto"]


def _whole(value):
    """25.0 is the integer 25, as JSON Schema says; 25.5 and "25" stay refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class ExpiresAfter(Strict):
    anchor: Literal["last_active_at"]
    days: StrictInt = Field(ge=1, le=365)

    _days = field_validator("days", mode="before")(_whole)


class ComparisonFilter(Strict):
    key: Key
    type: Literal["eq", "ne", "gt", "gte", "lt", "lte"]
    value: Value


class CompoundFilter(Strict):
    type: Literal["and", "or"]
    filters: list[Union[ComparisonFilter, "CompoundFilter"]] = Field(min_length=1, max_length=64)


CompoundFilter.model_rebuild()


class RankingOptions(Strict):
    ranker: Literal["auto", "default-2024-11-15", "none"] | None = None
    score_threshold: float = Field(0.0, ge=0.0, le=1.0)


class StoreIn(Strict):
    name: str | None = Field(None, max_length=256, pattern=TEXT_PATTERN)
    file_ids: list[Annotated[str, Field(pattern=ID_PATTERN)]] = Field(default_factory=list, max_length=500)
    metadata: Metadata | None = None
    expires_after: ExpiresAfter | None = None
    chunking_strategy: ChunkingStrategy | None = None


class StoreUpdate(Strict):
    name: str | None = Field(None, max_length=256, pattern=TEXT_PATTERN)
    metadata: Metadata | None = None
    expires_after: ExpiresAfter | None = None


class StoreFileIn(Strict):
    file_id: str = Field(pattern=ID_PATTERN)
    attributes: Attributes | None = None
    chunking_strategy: ChunkingStrategy | None = None


class StoreFileUpdate(Strict):
    attributes: Attributes | None


class BatchFile(StoreFileIn):
    pass


class BatchIn(Strict):
    file_ids: list[Annotated[str, Field(pattern=ID_PATTERN)]] = Field(default_factory=list, max_length=500)
    files: list[BatchFile] = Field(default_factory=list, max_length=500)
    attributes: Attributes | None = None
    chunking_strategy: ChunkingStrategy | None = None


Query_ = Annotated[str, StringConstraints(min_length=1, max_length=4000, pattern=TEXT_PATTERN)]


class SearchIn(Strict):
    query: Query_ | Annotated[list[Query_], Field(min_length=1, max_length=10)]
    max_num_results: StrictInt = Field(10, ge=1, le=MAX_RESULTS)
    filters: ComparisonFilter | CompoundFilter | None = None
    ranking_options: RankingOptions | None = None
    rewrite_query: StrictBool = False

    _count = field_validator("max_num_results", mode="before")(_whole)

    @model_validator(mode="after")
    def _bounded(self) -> "SearchIn":
        if self.filters is not None and _depth(self.filters) > MAX_FILTER_DEPTH:
            raise ValueError(f"filters may be nested at most {MAX_FILTER_DEPTH} deep")
        return self


def _depth(condition) -> int:
    return 1 + max((_depth(part) for part in condition.filters), default=0) if isinstance(
        condition, CompoundFilter) else 1


def build_retrieval_router(gateway: "GatewayServices") -> APIRouter:
    router = APIRouter(tags=["retrieval"], responses={**USAGE_ERRORS, **error_responses(404, 409, 413)})

    def caller(request: Request):
        tenant, key = identify(request.scope, gateway.config.current, "files")
        if gateway.retrieval is None:
            raise stateless_gateway() if gateway.directory is None else GatewayError(
                503, "Retrieval is off on this gateway.", type="server_error", code="retrieval_unavailable")
        return tenant, key

    async def own_store(tenant_id: str, store_id: str) -> dict:
        return await gateway.retrieval.owned_store(tenant_id, store_id)

    async def own_file(tenant_id: str, file_id: str, with_content: bool = False) -> dict:
        found = await gateway.retrieval.catalog.file(tenant_id, file_id, with_content)
        if found is None:
            raise GatewayError(404, f"No such File object: {file_id}", type="not_found_error", param="file_id",
                               code="file_not_found")
        return found

    @router.post("/v1/files", openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file", "purpose"], "properties": {
            "file": {"type": "string", "format": "binary", "description": ".txt, .md, .html or .pdf"},
            "purpose": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": TEXT_PATTERN}}}}}}})
    async def upload(request: Request) -> dict:
        """Upload a document (multipart/form-data: ``file``, ``purpose``): .txt, .md, .html or .pdf."""
        tenant, _ = caller(request)
        fields = _multipart(request.headers.get("content-type", ""), await request.body())
        upload = fields.get("file")
        if upload is None or upload[0] is None:
            raise GatewayError(400, "The upload needs a 'file' part with a filename.", param="file")
        filename, content = upload
        purpose = (fields.get("purpose") or (None, b""))[1].decode(errors="replace").strip()
        if not purpose or len(purpose) > 64 or "\x00" in purpose:
            raise GatewayError(400, "'purpose' is required: up to 64 characters without NUL (for example "
                                    "'assistants').", param="purpose")
        if "\x00" in filename or not filename.strip() or len(filename) > 255:
            raise GatewayError(400, "The file's name must be 1 to 255 characters, without NUL.", param="file")
        if not content:
            raise GatewayError(400, "The file is empty.", param="file", code="empty_file")
        if purpose == "fine-tune":  # OpenAI's chat JSONL, checked line by line before it is kept
            if not filename.lower().endswith(".jsonl"):
                raise GatewayError(400, "A fine-tuning file is JSONL: its name ends in .jsonl.", param="file",
                                   code="unsupported_file")
            await asyncio.to_thread(datasets.check, content, "file")
        elif documents.kind_of(filename) is None:
            raise GatewayError(400, f"'{filename}' is not a kind of file this gateway reads: use "
                                    f"{', '.join(sorted(documents.KINDS))}.", param="file", code="unsupported_file")
        return await gateway.retrieval.catalog.add_file(tenant.id, filename, purpose, content)

    @router.get("/v1/files")
    async def list_files(request: Request, limit: int = Query(100, ge=1, le=10_000), order: str = ORDER,
                         after: str | None = Query(None, pattern=ID_PATTERN),
                         purpose: str | None = Query(None, max_length=64, pattern=TEXT_PATTERN)) -> dict:
        """The tenant's files (of one ``purpose``, if given), newest first unless ``order`` is ``asc``."""
        tenant, _ = caller(request)
        return list_page(*await gateway.retrieval.catalog.files(tenant.id, Page(limit, order, after), purpose))

    @router.get("/v1/files/{file_id}")
    async def get_file(request: Request, file_id: str) -> dict:
        tenant, _ = caller(request)
        return await own_file(tenant.id, file_id)

    @router.get("/v1/files/{file_id}/content", response_class=Response)
    async def file_content(request: Request, file_id: str) -> Response:
        tenant, _ = caller(request)
        found = await own_file(tenant.id, file_id, with_content=True)
        return Response(found["content"], media_type="application/octet-stream")

    @router.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> dict:
        """Delete a file, and its chunks from every store it was in."""
        tenant, _ = caller(request)
        if not await gateway.retrieval.delete_file(tenant.id, file_id):
            await own_file(tenant.id, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @router.post("/v1/vector_stores")
    async def create_store(request: Request, body: StoreIn) -> dict:
        tenant, _ = caller(request)
        for file_id in body.file_ids:
            await own_file(tenant.id, file_id)
        store_id = await gateway.retrieval.catalog.add_store(
            tenant.id, body.name, body.metadata, body.expires_after.days if body.expires_after else None)
        for file_id in body.file_ids:
            await gateway.retrieval.attach(tenant.id, store_id, file_id)
        return await own_store(tenant.id, store_id)

    @router.get("/v1/vector_stores")
    async def list_stores(request: Request, limit: int = Query(20, ge=1, le=100), order: str = ORDER,
                          after: str | None = Query(None, pattern=ID_PATTERN),
                          before: str | None = Query(None, pattern=ID_PATTERN)) -> dict:
        """The tenant's vector stores, newest first unless ``order`` is ``asc``."""
        tenant, _ = caller(request)
        return list_page(*await gateway.retrieval.catalog.stores(tenant.id, Page(limit, order, after, before)))

    @router.get("/v1/vector_stores/{store_id}")
    async def get_store(request: Request, store_id: str) -> dict:
        tenant, _ = caller(request)
        return await own_store(tenant.id, store_id)

    @router.post("/v1/vector_stores/{store_id}")
    async def update_store(request: Request, store_id: str, body: StoreUpdate) -> dict:
        """Rename a store, replace its metadata or its expiry (a field sent as null clears it; one left out
        stays)."""
        tenant, _ = caller(request)
        changes = {field: getattr(body, field) for field in body.model_fields_set}
        if "expires_after" in changes:
            expiry = changes.pop("expires_after")
            changes["expires_after_days"] = expiry.days if expiry is not None else None
        await gateway.retrieval.catalog.update_store(tenant.id, store_id, changes)  # no store of the tenant's: no row
        return await own_store(tenant.id, store_id)  # and a 404 here

    @router.delete("/v1/vector_stores/{store_id}")
    async def delete_store(request: Request, store_id: str) -> dict:
        """Delete a store and its chunks (its files stay)."""
        tenant, _ = caller(request)
        if not await gateway.retrieval.delete_store(tenant.id, store_id):
            await own_store(tenant.id, store_id)
        return {"id": store_id, "object": "vector_store.deleted", "deleted": True}

    @router.post("/v1/vector_stores/{store_id}/files")
    async def add_store_file(request: Request, store_id: str, body: StoreFileIn) -> dict:
        """Put a file in a store: it is indexed off the request path; follow ``status``."""
        tenant, _ = caller(request)
        await own_store(tenant.id, store_id)
        await own_file(tenant.id, body.file_id)
        await gateway.retrieval.attach(tenant.id, store_id, body.file_id, body.attributes)
        return link_view(await gateway.retrieval.catalog.link(tenant.id, store_id, body.file_id))

    @router.post("/v1/vector_stores/{store_id}/files/{file_id}")
    async def update_store_file(request: Request, store_id: str, file_id: str, body: StoreFileUpdate) -> dict:
        """Replace a file's attributes in a store (what search ``filters`` compare)."""
        tenant, _ = caller(request)
        if not await gateway.retrieval.catalog.set_attributes(tenant.id, store_id, file_id, body.attributes):
            await own_store(tenant.id, store_id)
            raise not_in_store(file_id, store_id)
        return link_view(await gateway.retrieval.catalog.link(tenant.id, store_id, file_id))

    @router.get("/v1/vector_stores/{store_id}/files/{file_id}/content")
    async def store_file_content(request: Request, store_id: str, file_id: str) -> dict:
        """The text of a file in a store, as it was read for indexing."""
        tenant, _ = caller(request)
        if await gateway.retrieval.catalog.link(tenant.id, store_id, file_id) is None:
            await own_store(tenant.id, store_id)
            raise not_in_store(file_id, store_id)
        found = await own_file(tenant.id, file_id, with_content=True)
        try:
            text = await asyncio.to_thread(documents.text_of, found["content"],
                                           documents.kind_of(found["filename"]) or "text")
        except documents.Unreadable:
            text = ""
        return {"object": "vector_store.file_content.page", "data": [{"type": "text", "text": text}] if text else [],
                "has_more": False, "next_page": None}

    @router.post("/v1/vector_stores/{store_id}/file_batches")
    async def create_batch(request: Request, store_id: str, body: BatchIn) -> dict:
        """Put several files in a store at once; follow the batch's ``status`` and ``file_counts``."""
        tenant, _ = caller(request)
        await own_store(tenant.id, store_id)
        files = [*body.files, *(BatchFile(file_id=file_id, attributes=body.attributes) for file_id in body.file_ids)]
        for item in files:
            await own_file(tenant.id, item.file_id)
        batch_id = await gateway.retrieval.catalog.add_batch(tenant.id, store_id)
        for item in files:
            await gateway.retrieval.attach(tenant.id, store_id, item.file_id, item.attributes, batch_id)
        return await own_batch(tenant.id, store_id, batch_id)

    @router.get("/v1/vector_stores/{store_id}/file_batches/{batch_id}")
    async def get_batch(request: Request, store_id: str, batch_id: str) -> dict:
        tenant, _ = caller(request)
        return await own_batch(tenant.id, store_id, batch_id)

    @router.post("/v1/vector_stores/{store_id}/file_batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, store_id: str, batch_id: str) -> dict:
        """Stop the batch's files still waiting (``cancelled``); those indexed stay."""
        tenant, _ = caller(request)
        await own_batch(tenant.id, store_id, batch_id)
        await gateway.retrieval.cancel_batch(tenant.id, store_id, batch_id)
        return await own_batch(tenant.id, store_id, batch_id)

    @router.get("/v1/vector_stores/{store_id}/file_batches/{batch_id}/files")
    async def list_batch_files(request: Request, store_id: str, batch_id: str, limit: int = Query(20, ge=1, le=100),
                               order: str = ORDER, after: str | None = Query(None, pattern=ID_PATTERN),
                               before: str | None = Query(None, pattern=ID_PATTERN),
                               filter: str | None = Query(None, pattern="^(in_progress|completed|failed|cancelled)$")
                               ) -> dict:
        tenant, _ = caller(request)
        await own_batch(tenant.id, store_id, batch_id)
        rows, more = await gateway.retrieval.catalog.links(tenant.id, store_id, filter,
                                                           Page(limit, order, after, before), batch_id)
        return list_page([link_view(row) for row in rows], more)

    async def own_batch(tenant_id: str, store_id: str, batch_id: str) -> dict:
        found = await gateway.retrieval.catalog.batch(tenant_id, store_id, batch_id)
        if found is None:
            await own_store(tenant_id, store_id)
            raise GatewayError(404, f"No file batch '{batch_id}' in vector store '{store_id}'.",
                               type="not_found_error", code="file_batch_not_found")
        return found

    @router.get("/v1/vector_stores/{store_id}/files")
    async def list_store_files(request: Request, store_id: str, limit: int = Query(20, ge=1, le=100),
                               order: str = ORDER, after: str | None = Query(None, pattern=ID_PATTERN),
                               before: str | None = Query(None, pattern=ID_PATTERN),
                               filter: str | None = Query(None, pattern="^(in_progress|completed|failed|cancelled)$")
                               ) -> dict:
        tenant, _ = caller(request)
        await own_store(tenant.id, store_id)
        rows, more = await gateway.retrieval.catalog.links(tenant.id, store_id, filter,
                                                           Page(limit, order, after, before))
        return list_page([link_view(row) for row in rows], more)

    @router.get("/v1/vector_stores/{store_id}/files/{file_id}")
    async def get_store_file(request: Request, store_id: str, file_id: str) -> dict:
        tenant, _ = caller(request)
        link = await gateway.retrieval.catalog.link(tenant.id, store_id, file_id)
        if link is None:
            await own_store(tenant.id, store_id)
            raise not_in_store(file_id, store_id)
        return link_view(link)

    @router.delete("/v1/vector_stores/{store_id}/files/{file_id}")
    async def remove_store_file(request: Request, store_id: str, file_id: str) -> dict:
        """Take a file out of a store, with its chunks (the file stays)."""
        tenant, _ = caller(request)
        if not await gateway.retrieval.detach(tenant.id, store_id, file_id):
            await own_store(tenant.id, store_id)
            raise not_in_store(file_id, store_id)
        return {"id": file_id, "object": "vector_store.file.deleted", "deleted": True}

    @router.post("/v1/vector_stores/{store_id}/search")
    async def search(request: Request, store_id: str, body: SearchIn) -> dict:
        """The chunks of the store nearest in meaning to ``query`` (one, or up to ten), best first, with their file,
        score and the file's attributes; ``filters`` compare the attributes, ``ranking_options.score_threshold`` drops
        weaker hits."""
        tenant, key = caller(request)
        if body.rewrite_query:
            raise GatewayError(400, "rewrite_query is not served: this gateway searches with the query as given.",
                               param="rewrite_query", code="unsupported_parameter")
        await gateway.retrieval.searchable_store(tenant.id, store_id)
        threshold = body.ranking_options.score_threshold if body.ranking_options else None
        hits = await gateway.retrieval.search(
            tenant, key, [store_id], body.query, body.max_num_results,
            body.filters.model_dump() if body.filters is not None else None, threshold or None)
        return {"object": "vector_store.search_results.page", "search_query": body.query, "has_more": False,
                "next_page": None,
                "data": [{"file_id": h.file_id, "filename": h.filename, "score": round(h.score, 6),
                          "attributes": h.attributes, "chunk": h.chunk,
                          "content": [{"type": "text", "text": h.text}]} for h in hits]}

    return router


def not_in_store(file_id: str, store_id: str) -> GatewayError:
    return GatewayError(404, f"No file '{file_id}' in vector store '{store_id}'.", type="not_found_error",
                        code="file_not_found")


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The parts of a multipart/form-data body: name -> (filename, bytes)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise GatewayError(400, "Upload files as multipart/form-data (the 'file' and 'purpose' fields).",
                           code="invalid_content_type")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise GatewayError(400, "The multipart body cannot be read.", code="invalid_multipart")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


__all__ = ["build_retrieval_router"]
