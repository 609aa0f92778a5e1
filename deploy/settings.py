"""Configuration, from ``MEDIRAG_*`` environment variables.

Every setting has a default that runs the embedded deployment (a local data directory holding
the models, an embedded PostgreSQL, a folder of DICOM files); pointing the DSN, the DICOMweb URL
and the trusted clients at real systems turns it into a hospital deployment. The README's
configuration table lists them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """All settings; see the README's configuration table for each one's meaning."""

    model_config = SettingsConfigDict(env_prefix="MEDIRAG_", extra="ignore")

    env: Literal["development", "production"] = "development"
    data_dir: Path = Path(".medirag")
    shared_data: Path = Path("../shared/data")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    public_base_url: str = "http://127.0.0.1:8080"
    clients: Path | None = None
    dsn: str | None = None
    models_dir: Path | None = None
    image_model: str = "tiny-biomedclip"
    text_model: str = "minilm"
    reranker: str | None = None
    onnx_providers: str = "auto"
    onnx_precision: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    onnx_graph_optimization: Literal["disabled", "basic", "extended", "all"] = "all"
    onnx_intra_op_threads: int | None = Field(default=None, ge=1)
    onnx_inter_op_threads: int | None = Field(default=None, ge=1)
    onnx_warmup: bool = True
    onnx_trt_cache_dir: Path | None = None
    onnx_device_id: int = Field(default=0, ge=0)
    batch_max: int = Field(default=32, ge=1, le=1024)
    batch_max_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    dicomweb_url: str | None = None
    dicomweb_username: str | None = None
    dicomweb_password: SecretStr | None = None
    dicomweb_timeout_s: float = Field(default=3.0, gt=0)
    dicomweb_retry_after_max_s: float = Field(default=1.0, ge=0)
    dicom_max_pixels: int = Field(default=25_000_000, ge=1)
    dicom_max_frames: int = Field(default=4, ge=1)
    dicom_dir: Path | None = None
    fhir_bundles: Path | None = None
    fhir_timeout_s: float = Field(default=4.0, gt=0)
    fhir_retry_attempts: int = Field(default=3, ge=1, le=10)
    fhir_breaker_failures: int = Field(default=5, ge=1)
    fhir_breaker_cool_down_s: float = Field(default=30.0, gt=0)
    allow_loopback_http: bool = False
    deadline_s: float = Field(default=4.0, gt=0.5, le=60)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_json_depth: int = Field(default=64, ge=8)
    cors_origins: str = ""
    jwt_leeway_s: float = Field(default=60.0, ge=0, le=300)
    jwt_max_lifetime_s: float = Field(default=300.0, gt=0, le=3600)
    smart_launch_url: str | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    fusion_image_weight: float = Field(default=0.5, ge=0)
    fusion_findings_weight: float = Field(default=0.5, ge=0)
    cases_k: int = Field(default=5, ge=1, le=50)
    passages_k: int = Field(default=3, ge=1, le=20)
    rrf_k: int = Field(default=60, ge=1)
    literature_candidates: int = Field(default=30, ge=1, le=1000)
    hnsw_m: int = Field(default=16, ge=2, le=100)
    hnsw_ef_construction: int = Field(default=64, ge=4, le=1000)
    ef_search: int = Field(default=40, ge=1, le=1000)
    rerank_top_n: int = Field(default=20, ge=1, le=1000)
    min_labs: int = Field(default=3, ge=1)
    log_format: Literal["json", "text"] = "json"

    @property
    def cors_origin_list(self) -> list[str]:
        """``cors_origins`` split at commas."""
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def models_path(self) -> Path:
        """Where exported models live (``models_dir``, else ``data_dir/models``)."""
        return self.models_dir or self.data_dir / "models"

    @property
    def dicom_path(self) -> Path:
        """The DICOM folder of the embedded imaging archive."""
        return self.dicom_dir or self.data_dir / "fixtures" / "dicom"

    @property
    def postgres_path(self) -> Path:
        """The data directory of the embedded PostgreSQL."""
        return self.data_dir / "postgres"
