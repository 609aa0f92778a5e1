import uuid

import pytest
from pydantic import ValidationError

from cds_hooks.requests import HookRequest, PatientViewContext, fhir_server_allowed


@pytest.mark.parametrize(
    ("url", "dev", "allowed"),
    [
        ("https://ehr.example.org/fhir", False, True),
        ("http://ehr.example.org/fhir", False, False),
        ("http://ehr.example.org/fhir", True, False),  # dev allows loopback only
        ("http://127.0.0.1:8080/fhir", False, False),
        ("http://127.0.0.1:8080/fhir", True, True),
        ("http://[::1]/fhir", True, True),
        ("http://localhost/fhir", True, True),
        ("http://localhost.evil.example/fhir", True, False),
        ("ftp://ehr.example.org/fhir", True, False),
        ("https:///no-host", False, False),
        ("not a url", True, False),
    ],
)
def test_fhir_server_allowed(url, dev, allowed):
    assert fhir_server_allowed(url, allow_loopback_http=dev) is allowed


def test_access_token_is_secret():
    request = HookRequest.model_validate(
        {
            "hook": "patient-view",
            "hookInstance": str(uuid.uuid4()),
            "fhirServer": "https://ehr/fhir",
            "fhirAuthorization": {
                "access_token": "tok-123",
                "token_type": "Bearer",
                "expires_in": 10,
                "scope": "s",
                "subject": "c",
            },
            "context": {},
        }
    )
    assert "tok-123" not in repr(request)
    assert "tok-123" not in str(request.model_dump())
    assert request.fhirAuthorization.access_token.get_secret_value() == "tok-123"


def test_token_type_must_be_bearer():
    with pytest.raises(ValidationError, match="token_type"):
        HookRequest.model_validate(
            {
                "hook": "patient-view",
                "hookInstance": str(uuid.uuid4()),
                "fhirServer": "https://ehr/fhir",
                "fhirAuthorization": {
                    "access_token": "t",
                    "token_type": "MAC",
                    "expires_in": 1,
                    "scope": "s",
                    "subject": "c",
                },
                "context": {},
            }
        )


@pytest.mark.parametrize("patient", ["abc-123.X", "a" * 64])
def test_fhir_ids_accepted(patient):
    assert PatientViewContext(userId="Practitioner/1", patientId=patient).patientId == patient


@pytest.mark.parametrize("patient", ["", "a" * 65, "a b", "a/b", "Patient/1", "é"])
def test_non_fhir_ids_refused(patient):
    with pytest.raises(ValidationError):
        PatientViewContext(userId="Practitioner/1", patientId=patient)
