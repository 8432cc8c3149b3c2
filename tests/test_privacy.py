"""Keyed pseudonyms (inspector.privacy): the key file, its location and rights, and the HMAC scheme.

Every test points the key at a temporary file (environment variable or LoadConfig field); none
touches the user's real config folder.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from inspector import privacy
from inspector.io import LoadConfig, load_cohort
from inspector.preprocess import PreprocessConfig
from inspector.privacy import (
    KEY_BYTES,
    KEY_ENV_VAR,
    PseudonymKeyError,
    key_path,
    load_or_create_key,
    pseudonym,
)

NATIVE = LoadConfig(preprocess=PreprocessConfig(size=None))


@pytest.fixture(autouse=True)
def pv_env_key(tmp_path_factory, monkeypatch) -> Path:
    """The default key of every test: a temporary file named by the environment variable."""
    path = tmp_path_factory.mktemp("pvkey") / "pseudonym.key"
    monkeypatch.setenv(KEY_ENV_VAR, str(path))
    return path


def pv_dicom(path: Path, patient_id: str, seed: int = 0) -> Path:
    arr = np.random.default_rng(seed).integers(50, 1000, size=(10, 10)).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientID = patient_id
    ds.PatientName = "DOE^JANE"
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[patient_id])
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------------------------
# the scheme
# ----------------------------------------------------------------------------------------------


def test_pseudonym_is_an_hmac_with_the_key_and_twelve_hex_digits():
    import hmac

    key = os.urandom(KEY_BYTES)
    p = pseudonym("MRN-123456", key)
    assert p == "sub-" + hmac.new(key, b"MRN-123456", hashlib.sha256).hexdigest()[:12]
    assert len(p) == 16 and all(ch in "0123456789abcdef" for ch in p[4:])
    assert pseudonym("MRN-123456", key) == p  # stable for one key
    assert pseudonym("MRN-123457", key) != p


def test_two_keys_give_unrelated_pseudonyms():
    k1, k2 = os.urandom(KEY_BYTES), os.urandom(KEY_BYTES)
    ids = [f"MRN-{i:06d}" for i in range(200)]
    a = [pseudonym(i, k1) for i in ids]
    b = [pseudonym(i, k2) for i in ids]
    assert len(set(a)) == len(ids) and set(a).isdisjoint(b)


def test_the_old_constant_salt_digest_is_never_produced(tmp_path):
    """The former scheme: sha256("inspector-v1" + PatientID)[:10], computable from the ID alone."""
    pv_dicom(tmp_path / "pat" / "a.dcm", "PID-0001")
    c = load_cohort(tmp_path, NATIVE)
    sid = c[0].subject_id
    for salt in ("inspector-v1", ""):
        digest = hashlib.sha256((salt + "PID-0001").encode()).hexdigest()
        assert digest[:10] not in sid and sid != "sub-" + digest[:10] and sid != "sub-" + digest[:12]
    assert sid == pseudonym("PID-0001", load_or_create_key())


def test_pseudonym_refuses_a_missing_or_short_key():
    for bad in ("inspector-v1", b"short", None):
        with pytest.raises(TypeError, match="secret key bytes"):
            pseudonym("x", bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# the key file: where, created how, read how
# ----------------------------------------------------------------------------------------------


def test_key_is_created_on_first_use_with_mode_0600_and_then_stable(pv_env_key):
    assert not pv_env_key.exists()
    k = load_or_create_key()
    assert len(k) == KEY_BYTES and pv_env_key.is_file()
    if os.name == "posix":
        assert stat.S_IMODE(pv_env_key.stat().st_mode) == 0o600
    assert pv_env_key.read_text().strip() == k.hex()
    assert load_or_create_key() == k == load_or_create_key(pv_env_key)
    assert not [p for p in pv_env_key.parent.iterdir() if p.name != pv_env_key.name]  # no temp file left


def test_key_folder_is_created_private(tmp_path, monkeypatch):
    where = tmp_path / "deep" / "er" / "pseudonym.key"
    monkeypatch.setenv(KEY_ENV_VAR, str(where))
    load_or_create_key()
    if os.name == "posix":
        assert stat.S_IMODE(where.parent.stat().st_mode) & 0o077 == 0


def test_key_path_order_explicit_then_env_then_user_config_dir(tmp_path, monkeypatch):
    import platformdirs

    explicit = tmp_path / "explicit.key"
    assert key_path(explicit) == explicit
    assert key_path() == Path(os.environ[KEY_ENV_VAR])
    monkeypatch.setenv(KEY_ENV_VAR, "")
    default = Path(platformdirs.user_config_dir("mri-memorization-inspector", appauthor=False)) / "pseudonym.key"
    assert key_path() == default  # computed only: nothing is created by key_path
    monkeypatch.delenv(KEY_ENV_VAR)
    assert key_path() == default
    monkeypatch.setenv(KEY_ENV_VAR, "~/somewhere/k.key")
    assert key_path() == Path.home() / "somewhere" / "k.key"


def test_the_key_stays_stable_across_processes(pv_env_key):
    code = "from inspector.privacy import load_or_create_key; print(load_or_create_key().hex())"
    env = {**os.environ, KEY_ENV_VAR: str(pv_env_key)}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]  # fmt: skip
    assert runs[0].stdout == runs[1].stdout == load_or_create_key().hex() + "\n"


def test_concurrent_first_use_agrees_on_one_key(pv_env_key):
    got: list[bytes] = []
    barrier = threading.Barrier(8)

    def first_use() -> None:
        barrier.wait()
        got.append(load_or_create_key())

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1 and got[0] == load_or_create_key()


def test_a_deliberately_shared_key_links_sites_and_raw_32_byte_keys_are_accepted(tmp_path):
    shared = os.urandom(KEY_BYTES)
    site_a, site_b = tmp_path / "a.key", tmp_path / "b.key"
    site_a.write_text(shared.hex() + "\n")
    site_b.write_bytes(shared)  # e.g. head -c 32 /dev/urandom > key
    for p in (site_a, site_b):
        p.chmod(0o600)
    assert load_or_create_key(site_a) == load_or_create_key(site_b) == shared
    pv_dicom(tmp_path / "data" / "x.dcm", "PID-7")
    ca = load_cohort(tmp_path / "data", LoadConfig(pseudonym_key_file=str(site_a)))
    cb = load_cohort(tmp_path / "data", LoadConfig(pseudonym_key_file=site_b))  # PathLike accepted
    assert ca.subjects == cb.subjects == [pseudonym("PID-7", shared)]


@pytest.mark.parametrize(
    "content, match",
    [(b"", "does not hold a key"), (b"abcd\n", "does not hold a key"), (b"zz" * 32, "does not hold a key")],
)
def test_a_malformed_key_file_is_a_clear_error_not_a_new_key(tmp_path, content, match):
    bad = tmp_path / "bad.key"
    bad.write_bytes(content)
    with pytest.raises(PseudonymKeyError, match=match):
        load_or_create_key(bad)
    assert bad.read_bytes() == content  # never overwritten: that would change every pseudonym


def test_a_key_path_that_is_a_folder_or_unwritable_is_a_clear_error(tmp_path):
    with pytest.raises(PseudonymKeyError, match="not a regular file"):
        load_or_create_key(tmp_path)
    if os.name == "posix" and os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(PseudonymKeyError, match="Cannot create the pseudonym key file"):
                load_or_create_key(ro / "k.key")
        finally:
            ro.chmod(0o700)


def test_a_key_readable_by_others_is_used_with_a_warning(tmp_path, caplog):
    k = tmp_path / "open.key"
    k.write_text(os.urandom(KEY_BYTES).hex())
    k.chmod(0o644)
    assert len(load_or_create_key(k)) == KEY_BYTES
    assert "readable by other users" in caplog.text and "chmod 600" in caplog.text


def test_load_config_key_file_overrides_the_environment(tmp_path, pv_env_key):
    mine = tmp_path / "mine.key"
    pv_dicom(tmp_path / "d" / "x.dcm", "PID-9")
    c = load_cohort(tmp_path / "d", LoadConfig(pseudonym_key_file=str(mine)))
    assert mine.is_file() and not pv_env_key.exists()
    assert c.subjects == [pseudonym("PID-9", load_or_create_key(mine))]
    with pytest.raises(TypeError, match="pseudonym_key_file"):
        LoadConfig(pseudonym_key_file=123)  # type: ignore[arg-type]


def test_no_key_is_created_when_no_dicom_is_read(tmp_path, pv_env_key):
    np.save(tmp_path / "v.npy", np.random.default_rng(1).integers(1, 100, (8, 8)))
    load_cohort(tmp_path, NATIVE)
    assert not pv_env_key.exists()


def test_an_unusable_key_file_stops_a_dicom_load_with_its_reason(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    pv_dicom(tmp_path / "d" / "x.dcm", "PID-1")
    with pytest.raises(PseudonymKeyError, match="does not hold a key"):
        load_cohort(tmp_path / "d", LoadConfig(pseudonym_key_file=str(bad)))


def test_the_key_never_appears_in_the_cohort_or_the_log(tmp_path, caplog):
    caplog.set_level("DEBUG")
    pv_dicom(tmp_path / "d" / "x.dcm", "PID-2")
    c = load_cohort(tmp_path / "d", NATIVE)
    key = load_or_create_key()
    blob = "\n".join([c.summary(), caplog.text, *(repr(s) for s in c), *(str(f) for f in c.files)])
    assert key.hex() not in blob and key.hex()[:16] not in blob
    assert "PID-2" not in blob and "DOE^JANE" not in blob


def test_module_documents_the_scheme_location_and_sharing():
    doc = privacy.__doc__ or ""
    for needle in ("HMAC-SHA256", KEY_ENV_VAR, "user_config_dir", "pseudonym.key", "0600", "Sharing across sites"):
        assert needle in doc
