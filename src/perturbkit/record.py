"""RO-Crate packaging of a run directory (RO-Crate 1.1 + Workflow Run Crate 0.5), made with the ``rocrate`` library.

Shared by ``perturbkit bench`` (``run.json``) and ``perturbkit tune`` (``record.json``): both call
``write_crate(out, record, name=..., description=...)`` with their run record, a dict holding at least
``kind``, ``config``, ``versions``, ``data`` (``sha256``, ``file`` or ``source``, ``dataset``), ``started`` and
``ended``. The crate says, in ``ro-crate-metadata.json`` at the root of the run directory:

- the *workflow* (the crate's ``mainEntity``): the config as run (``config.toml``; where the directory has no
  config file, the record's config is written to ``config.json``), typed
  ``File, SoftwareSourceCode, ComputationalWorkflow`` and written in the language "perturbkit <verb>
  configuration", with one ``FormalParameter`` per setting (``input``) and per kind of output (``output``);
- the *run*: one ``CreateAction`` whose ``instrument`` is the workflow, with ``startTime`` / ``endTime``, the
  input data (a ``File`` with its sha256) and every setting's value (a ``PropertyValue`` pointing at its
  ``FormalParameter``) as ``object``, and every output file (with sha256 and size) as ``result``;
- the *software*: perturbkit (``SoftwareApplication`` with ``softwareVersion``) running the workflow, and the
  libraries that shape the numbers, each with its version.

:func:`write_crate` lists the files present when it is called; bench calls it after every aggregation and
``perturbkit report`` calls it again, so the crate always lists the files that are there.
"""

from __future__ import annotations

import json
import mimetypes
import platform
from pathlib import Path
from typing import Any

from ._io import stamp  # noqa: F401  (record.stamp: the one timestamp format)

PROFILES = {
    "https://w3id.org/ro/wfrun/process/0.5": ("Process Run Crate", "0.5"),
    "https://w3id.org/ro/wfrun/workflow/0.5": ("Workflow Run Crate", "0.5"),
    "https://w3id.org/workflowhub/workflow-ro-crate/1.0": ("Workflow RO-Crate", "1.0"),
}
METADATA = "ro-crate-metadata.json"
SKIP = {METADATA, "ro-crate-preview.html"}
CONFIG_FILES = ("config.toml", "config.json")
#: terms used here that the RO-Crate 1.1 context does not define (sha256 is schema.org's, standardised in 1.2)
EXTRA_TERMS = {"sha256": "http://schema.org/sha256"}

#: output FormalParameters: (id suffix, name, description, how a file is recognised); the first match wins
OUTPUT_KINDS = (
    ("scores", "scores table", "tidy scores: scenario, split, model, seed, metric, value, ci_low, ci_high",
     lambda p: p == "scores.csv"),
    ("summary", "summary table", "mean and 95 % interval over seeds, and rank, per model and metric",
     lambda p: p == "summary.csv"),
    ("record", "run record", "versions, data, splits, timings and outputs of the run",
     lambda p: p in ("run.json", "record.json")),
    ("cells", "cell results", "per-cell scores, results, predictions and weights", lambda p: p.startswith("cells/")),
    ("tables", "tables", "result tables (CSV)", lambda p: p.endswith(".csv")),
    ("figures", "figures", "figures (PNG)", lambda p: p.startswith("figures/") or p.endswith(".png")),
    ("report", "report", "self-contained HTML report", lambda p: p.endswith(".html")),
    ("predictions", "predictions", "predicted cells (AnnData .h5ad)", lambda p: p.endswith(".h5ad")),
    ("models", "model weights", "fitted models: params.json + weights.safetensors",
     lambda p: p.endswith(".safetensors") or p.endswith("params.json")),
    ("other", "other outputs", "other files of the run directory", lambda p: True),
)


def _iso(ts: str) -> str:
    """``2024-01-02T03:04:05+0100`` -> ``2024-01-02T03:04:05+01:00`` (ISO 8601 as schema.org expects)."""
    if len(ts) > 5 and ts[-5] in "+-" and ts[-4:].isdigit():
        return f"{ts[:-2]}:{ts[-2:]}"
    return ts


def _files(out: Path) -> list[str]:
    rels = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if not p.is_file() or rel.as_posix() in SKIP or any(part.startswith(".") for part in rel.parts):
            continue
        rels.append(rel.as_posix())
    return rels


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"training.epochs": 10, "models.scgen.n_hidden": 800, ...}``.

    Lists of tables that carry a ``label`` (bench's models) are keyed by it; other lists are kept as values.
    """
    flat: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list) and d and all(isinstance(x, dict) and "label" in x for x in d):
        for x in d:  # {"label": "scgen", "model": "scgen", "params": {...}} -> models.scgen.model, .n_hidden, ...
            rest = {k: v for k, v in x.items() if k not in ("label", "params")}
            flat.update(_flatten({**rest, **(x.get("params") or {})}, f"{prefix}.{x['label']}"))
    else:
        flat[prefix] = d
    return flat


def _param_type(value) -> str:
    if isinstance(value, bool):
        return "Boolean"
    if isinstance(value, int):
        return "Integer"
    if isinstance(value, float):
        return "Float"
    return "Text"  # strings, and lists / None written as JSON text


def _value(value):
    if value is None:
        return "none"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def _id_part(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def write_crate(out: str | Path, record: dict[str, Any] | None = None, *, name: str | None = None,
                description: str | None = None, license: str | None = None) -> Path:
    """Write ``ro-crate-metadata.json`` describing the run directory ``out`` and every file in it.

    ``record`` is the run's record (default: ``out/run.json``, the bench record). ``license`` (default: the
    record's ``config.output.license``, else CC BY 4.0) is the license of the results; change it before
    depositing if yours differs.
    """
    import base64

    from rocrate.model.computerlanguage import ComputerLanguage
    from rocrate.model.contextentity import ContextEntity
    from rocrate.rocrate import ROCrate

    from . import _io
    from .data import DATASETS, sha256

    out = Path(out)
    if record is None:
        record = json.loads((out / "run.json").read_text())
    cfg = record.get("config", {})
    versions = record.get("versions", {})
    verb = str(record.get("kind", "perturbkit.run")).split(".")[-1]
    pk_version = versions.get("perturbkit", "unknown")
    crate = ROCrate(version="1.1")
    crate.metadata.extra_terms = dict(EXTRA_TERMS)
    root = crate.root_dataset
    root["name"] = name or f"perturbkit {verb}: {record.get('name', out.name)}"
    root["description"] = description or record.get("description") or (
        f"perturbkit {verb} run on {record.get('data', {}).get('file', 'the input data')} "
        f"(perturbkit {pk_version}).")
    root["datePublished"] = _iso(record.get("ended") or stamp())
    license_id = license or (cfg.get("output") or {}).get("license") or "https://creativecommons.org/licenses/by/4.0/"
    root["license"] = crate.add(ContextEntity(crate, license_id, properties={"@type": "CreativeWork",
                                                                             "name": license_id}))
    root["conformsTo"] = [crate.add(ContextEntity(crate, pid, properties={
        "@type": "CreativeWork", "name": pname, "version": pversion})) for pid, (pname, pversion) in PROFILES.items()]

    # ---- software: perturbkit runs the workflow; the libraries that shape the numbers
    libs = [crate.add(ContextEntity(crate, f"https://pypi.org/project/{dist}/", properties={
        "@type": "SoftwareApplication", "name": dist, "softwareVersion": str(ver),
        "url": f"https://pypi.org/project/{dist}/{ver}/"}))
        for dist, ver in sorted(versions.items()) if dist not in ("perturbkit", "python") and ver != "not installed"]
    python = crate.add(ContextEntity(crate, "https://www.python.org/", properties={
        "@type": "SoftwareApplication", "name": "Python", "softwareVersion": str(versions.get("python", "")),
        "url": "https://www.python.org/"}))
    perturbkit = crate.add(ContextEntity(crate, "#perturbkit", properties={
        "@type": "SoftwareApplication", "name": "perturbkit", "softwareVersion": pk_version,
        "description": "predict single-cell perturbation responses and benchmark them",
        "softwareRequirements": [python, *libs]}))
    lang = crate.add(ComputerLanguage(crate, f"#perturbkit-{verb}-config", properties={
        "name": f"perturbkit {verb} configuration", "alternateName": f"perturbkit-{verb}-config",
        "version": pk_version, "description": f"the settings read by `perturbkit {verb}` (see its docs)"}))

    # ---- the workflow: the config as run
    wf_file = next((f for f in CONFIG_FILES if (out / f).is_file()), None)
    if wf_file is None:
        wf_file = "config.json"
        _io.atomic_write_text(out / wf_file, json.dumps(cfg, indent=2) + "\n")
    files = _files(out)
    workflow = crate.add_workflow(out / wf_file, wf_file, main=True, lang=lang, properties={
        "name": f"perturbkit {verb} config ({wf_file})",
        "encodingFormat": "application/toml" if wf_file.endswith(".toml") else "application/json",
        "sha256": sha256(out / wf_file), "contentSize": str((out / wf_file).stat().st_size),
        "version": str(record.get("config_sha") or pk_version), "softwareRequirements": perturbkit})

    # ---- inputs: the data (not copied: named by its sha256, RFC 6920) and every setting
    data = dict(record.get("data", {}))
    ds = DATASETS.get(data.get("dataset") or "")
    inputs, objects = [], []
    if data.get("sha256"):
        digest = base64.urlsafe_b64encode(bytes.fromhex(data["sha256"])).decode().rstrip("=")
        shape = f" ({data['n_cells']} cells x {data['n_genes']} genes after preprocessing)" if "n_cells" in data else ""
        props = {"@type": "File", "name": data.get("file") or Path(str(data.get("source", "data"))).name,
                 "sha256": data["sha256"], "encodingFormat": "application/x-hdf5",
                 "description": (f"bundled dataset {ds.name!r}" if ds else "input data") + shape}
        if ds is not None:
            props["identifier"] = ds.accession
            props["citation"] = crate.add(ContextEntity(crate, f"https://doi.org/{ds.doi}", properties={
                "@type": "ScholarlyArticle", "name": ds.reference}))
        data_entity = crate.add_file(f"ni:///sha-256;{digest}", properties=props)
        fp = crate.add_formal_parameter(name="data", additionalType="File", identifier="#param-data",
                                        description="input AnnData (.h5ad)", valueRequired=True)
        fp["workExample"] = data_entity
        data_entity["exampleOfWork"] = fp
        inputs.append(fp)
        objects.append(data_entity)
    for pname, value in _flatten(cfg).items():
        fp = crate.add_formal_parameter(name=pname, additionalType=_param_type(value),
                                        identifier=f"#param-{_id_part(pname)}", valueRequired=False)
        pv = crate.add(ContextEntity(crate, f"#pv-{_id_part(pname)}", properties={
            "@type": "PropertyValue", "name": pname, "value": _value(value), "exampleOfWork": fp}))
        fp["workExample"] = pv
        inputs.append(fp)
        objects.append(pv)
    workflow["input"] = inputs

    # ---- outputs: every file of the run directory
    out_params, results = {}, []
    for rel in files:
        if rel == wf_file:
            continue
        kind, kname, kdesc, _match = next(k for k in OUTPUT_KINDS if k[3](rel))
        if kind not in out_params:
            out_params[kind] = crate.add_formal_parameter(name=kname, additionalType="File",
                                                          identifier=f"#output-{kind}", description=kdesc)
        fmt = mimetypes.guess_type(rel)[0] or {".h5ad": "application/x-hdf5"}.get(Path(rel).suffix,
                                                                                   "application/octet-stream")
        entity = crate.add_file(out / rel, rel, properties={
            "name": rel, "encodingFormat": fmt, "sha256": sha256(out / rel),
            "contentSize": str((out / rel).stat().st_size), "exampleOfWork": out_params[kind]})
        out_params[kind].append_to("workExample", entity)
        results.append(entity)
    for fp in out_params.values():  # one example: a single value, as RO-Crate 1.1 recommends
        if isinstance(fp.get("workExample"), list) and len(fp["workExample"]) == 1:
            fp["workExample"] = fp["workExample"][0]
    workflow["output"] = list(out_params.values())

    # ---- the run
    cells = record.get("cells")
    finished = None if not isinstance(cells, dict) else sum(1 for c in cells.values() if c.get("status") == "finished")
    props = {"@type": "CreateAction", "name": f"perturbkit {verb} run",
             "startTime": _iso(record.get("started") or stamp()), "endTime": _iso(record.get("ended") or stamp()),
             "actionStatus": {"@id": "http://schema.org/CompletedActionStatus" if not record.get("missing")
                              else "http://schema.org/ActiveActionStatus"}}
    if finished is not None:
        props["description"] = f"{finished} of {len(cells)} cells finished"
    action = crate.add_action(workflow, identifier=f"#{verb}-run", object=objects, result=results, properties=props)
    action["agent"] = perturbkit
    root["mentions"] = action
    _io.atomic_write_text(out / METADATA, json.dumps(crate.metadata.generate(), indent=2) + "\n")
    return out / METADATA


def validate(out: str | Path, profile: str = "ro-crate-1.1", *, severity: str = "REQUIRED", offline: bool = True,
             cache_path: str | Path | None = None) -> tuple[bool, list[str]]:
    """Validate the crate in ``out`` with ``roc-validator`` (PyPI); returns (passed, issue messages).

    ``profile`` is a roc-validator profile identifier (``ro-crate-1.1``, ``workflow-run-crate``, ...).
    ``offline`` serves HTTP only from roc-validator's cache (``cache_path``; default: its user cache).
    """
    from rocrate_validator import services
    from rocrate_validator.models import ValidationSettings

    kwargs = {"cache_path": Path(cache_path)} if cache_path is not None else {}
    settings = ValidationSettings(rocrate_uri=str(Path(out).resolve()), profile_identifier=profile,
                                  requirement_severity=severity, offline=offline, **kwargs)
    result = services.validate(settings)
    issues = [f"{i.severity.name}: {getattr(i.check, 'identifier', '')} {i.message}" for i in result.get_issues()]
    return result.passed(), issues


# ================================================================================= the workflow as a crate

#: the profile WorkflowHub accepts for a workflow (a Snakemake one here), and the files of a workflow folder
#: the crate is built from: the main workflow, the JSON Schema of its config (its inputs), an example config
WORKFLOW_PROFILE = "https://w3id.org/workflowhub/workflow-ro-crate/1.0"
WORKFLOW_MAIN = "Snakefile"
WORKFLOW_SCHEMA = "schemas/config.schema.yaml"
WORKFLOW_EXAMPLE = "example.yaml"
WORKFLOW_README = "README.md"
BIOSCHEMAS_WORKFLOW = "https://bioschemas.org/profiles/ComputationalWorkflow/1.0-RELEASE"
AUTHOR_PLACEHOLDER = "YOUR NAME (placeholder: give --author, or edit creator before publishing)"
ORGANIZATION_PLACEHOLDER = "YOUR ORGANISATION (placeholder: give --organization, or edit publisher before publishing)"
SCHEMA_TYPES = {"string": "Text", "integer": "Integer", "number": "Float", "boolean": "Boolean"}


def header(path: Path) -> str:
    """The first paragraph of a file's leading ``#`` comment, as one line (what the file is); it ends at an
    empty or indented (example command) comment line."""
    lines = []
    for line in path.read_text().splitlines():
        if not lines and line.startswith("#!"):  # a script's interpreter line
            continue
        text = line[1:].strip() if line.startswith("#") and not line.startswith("#  ") else None
        if not text:
            break
        lines.append(text)
    return " ".join(lines)


def _workflow_params(crate, schema: dict[str, Any]) -> tuple[list, list]:
    """FormalParameters of the workflow's config schema: every property an input, every ``x-output`` an output."""
    inputs, outputs = [], []
    for pname, prop in (schema.get("properties") or {}).items():
        default = prop.get("default")
        inputs.append(crate.add_formal_parameter(
            name=pname, additionalType=SCHEMA_TYPES.get(prop.get("type"), "Text"), identifier=f"#param-{pname}",
            description=prop.get("description"), valueRequired=pname in schema.get("required", ()),
            defaultValue=None if default is None else str(default)))
        if prop.get("x-output"):
            outputs.append(crate.add_formal_parameter(
                name=f"{pname} directory", additionalType="Dataset", identifier=f"#output-{pname}",
                description=f"the run directory given as {pname}: {prop['x-output']}"))
    return inputs, outputs


def write_workflow_crate(workflow_dir: str | Path, out: str | Path, *, authors: tuple[str, ...] = (),
                         organization: str | None = None, name: str | None = None) -> Path:
    """Package a Snakemake workflow folder (perturbkit's ``workflow/``) as a Workflow RO-Crate for WorkflowHub.

    Parameters
    ----------
    workflow_dir
        the folder holding ``Snakefile`` (the crate's ``mainEntity``), ``schemas/config.schema.yaml`` (the
        workflow's inputs) and ``example.yaml`` (an example config); every other file in it (the profiles)
        goes into the crate too. Bench or tuning configs (``.toml``) that the example config names, relative
        to the folder above ``workflow_dir``, are copied to the same relative path, and so is ``LICENSE``.
    out
        a folder (new, empty, or an earlier workflow crate, which is replaced) or a ``.zip`` file (the form
        WorkflowHub uploads).
    authors
        the workflow's creators (a name, or ``NAME <ORCID URL>``); without any, one placeholder author to
        fill in before publishing.
    organization
        the authors' organisation, the crate's publisher (default: a placeholder); ``NAME <ROR URL>`` too.
    name
        the crate's name (default: "perturbkit workflow (Snakemake): ..."); its description is the Snakefile's
        first comment paragraph.

    Returns
    -------
    the path of the folder or zip file written.
    """
    import re
    import shutil
    import tempfile
    from importlib.metadata import PackageNotFoundError, metadata, version

    import yaml
    from rocrate.model.contextentity import ContextEntity
    from rocrate.model.person import Person
    from rocrate.rocrate import ROCrate

    from . import __version__, _io
    from .errors import InputError

    wdir, out = Path(workflow_dir).resolve(), Path(out)
    if not (wdir / WORKFLOW_MAIN).is_file():
        raise InputError(f"workflow_dir {str(workflow_dir)!r} holds no {WORKFLOW_MAIN}; give the workflow/ folder of "
                         "a perturbkit checkout.", params=("workflow_dir",))
    is_zip = out.suffix == ".zip"
    if is_zip and out.exists() and not (out.is_file() and _is_workflow_crate(out)):
        raise InputError(f"out {str(out)!r} exists and is not a workflow crate; give a new file name.",
                         params=("out",))
    if not is_zip:
        _io.check_out(out, accepts=lambda folder, entries: _is_workflow_crate(folder),
                         what="something other than a workflow crate")
    schema = yaml.safe_load((wdir / WORKFLOW_SCHEMA).read_text()) if (wdir / WORKFLOW_SCHEMA).is_file() else {}
    example = yaml.safe_load((wdir / WORKFLOW_EXAMPLE).read_text()) if (wdir / WORKFLOW_EXAMPLE).is_file() else {}
    try:
        smk_version = version("snakemake")
    except PackageNotFoundError:
        smk_version = None
    try:
        license_id = metadata("perturbkit").get("License-Expression") or "BSD-3-Clause"
    except PackageNotFoundError:
        license_id = "BSD-3-Clause"

    crate = ROCrate(version="1.1")
    root = crate.root_dataset
    snakefile_about = header(wdir / WORKFLOW_MAIN)
    root["name"] = name or "perturbkit workflow (Snakemake): benchmark cells and tuning workers as jobs"
    root["description"] = (f"{snakefile_about} Written in Snakemake; profiles for a laptop, SLURM and Kubernetes; "
                           f"every job runs perturbkit {__version__}.")
    root["datePublished"] = _iso(stamp())
    root["version"] = __version__
    root["keywords"] = ["single-cell", "perturbation", "benchmark", "hyperparameter tuning", "Snakemake"]
    root["license"] = crate.add(ContextEntity(crate, f"https://spdx.org/licenses/{license_id}", properties={
        "@type": "CreativeWork", "name": license_id, "identifier": f"https://spdx.org/licenses/{license_id}"}))
    def named(text: str, local_id: str) -> tuple[str, str]:  # "Name <https://...>" -> (url, name)
        m = re.fullmatch(r"\s*(.*?)\s*<\s*(https?://\S+)\s*>\s*", text)
        return (m.group(2), m.group(1)) if m else (local_id, text.strip())

    org_id, org_name = named(organization or ORGANIZATION_PLACEHOLDER, "#organization")
    org = crate.add(ContextEntity(crate, org_id, properties={"@type": "Organization", "name": org_name,
                                                             **({"url": org_id} if "://" in org_id else {})}))
    root["publisher"] = org
    people = [crate.add(Person(crate, pid, properties={"name": pname, "affiliation": org}))
              for pid, pname in (named(a, f"#author-{i}") for i, a in enumerate(authors or (AUTHOR_PLACEHOLDER,), 1))]
    root["creator"] = root["author"] = people[0] if len(people) == 1 else people
    perturbkit = crate.add(ContextEntity(crate, "#perturbkit", properties={
        "@type": "SoftwareApplication", "name": "perturbkit", "softwareVersion": __version__,
        "description": "predict single-cell perturbation responses and benchmark them; every job runs it"}))

    # ---- the main workflow, its inputs (the config schema) and outputs (the run directories)
    main = crate.add_workflow(wdir / WORKFLOW_MAIN, WORKFLOW_MAIN, main=True, lang="snakemake",
                              lang_version=smk_version, properties={
                                  "name": f"perturbkit workflow ({WORKFLOW_MAIN})", "description": snakefile_about,
                                  "version": __version__, "creator": root["creator"], "license": root["license"],
                                  "dateCreated": root["datePublished"], "conformsTo": crate.add(ContextEntity(
                                      crate, BIOSCHEMAS_WORKFLOW, properties={
                                          "@type": "CreativeWork", "name": "Bioschemas ComputationalWorkflow",
                                          "version": BIOSCHEMAS_WORKFLOW.rsplit("/", 1)[-1]})),
                                  "softwareRequirements": perturbkit,
                                  "encodingFormat": "text/x-snakemake"})
    main["input"], main["output"] = _workflow_params(crate, schema)

    # ---- the other files: profiles, schema, example config (+ the configs it names), licence
    descriptions = {WORKFLOW_SCHEMA: "JSON Schema of the workflow's config (its inputs)",
                    WORKFLOW_EXAMPLE: f"example config: snakemake -s {WORKFLOW_MAIN} --configfile {WORKFLOW_EXAMPLE}"}
    for rel in _files(wdir):
        if rel == WORKFLOW_MAIN or "__pycache__" in rel:
            continue
        if rel == WORKFLOW_README:  # WorkflowHub shows it: about the crate, markdown
            crate.add_file(wdir / rel, rel, properties={"name": rel, "about": root, "encodingFormat": "text/markdown"})
            continue
        about = descriptions.get(rel) or header(wdir / rel) or rel
        fmt = "text/yaml" if rel.endswith((".yaml", ".yml")) else mimetypes.guess_type(rel)[0] or "text/plain"
        crate.add_file(wdir / rel, rel, properties={"name": rel, "description": about, "encodingFormat": fmt})
    for key, value in (example or {}).items():
        src = wdir.parent / str(value)
        if isinstance(value, str) and value.endswith(".toml") and src.is_file():
            crate.add_file(src, value, properties={
                "name": value, "encodingFormat": "application/toml",
                "description": f"the {key!r} config of {WORKFLOW_EXAMPLE}: {header(src) or value}"})
    if (wdir.parent / "LICENSE").is_file():
        crate.add_file(wdir.parent / "LICENSE", "LICENSE", properties={
            "name": "LICENSE", "description": f"licence ({license_id})", "encodingFormat": "text/plain"})

    if is_zip:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            crate.write_zip(Path(tmp) / out.name)
            Path(tmp, out.name).replace(out)
        return out
    if out.exists():
        shutil.rmtree(out)
    crate.write(out)
    return out


def _is_workflow_crate(path: Path) -> bool:
    """Whether ``path`` (a folder or a .zip) is a crate that :func:`write_workflow_crate` wrote."""
    import zipfile

    try:
        if path.is_dir():
            text = (path / METADATA).read_text()
        else:
            with zipfile.ZipFile(path) as zf:
                text = zf.read(METADATA).decode()
    except (OSError, KeyError, zipfile.BadZipFile, UnicodeDecodeError):
        return False
    return WORKFLOW_PROFILE in text and '"#perturbkit"' in text


def link_workflow(out: str | Path, folder: str = "workflow") -> bool:
    """Make the run crate of ``out`` a Workflow Run Crate of the workflow that ran it, when ``out/folder`` holds
    that workflow's crate (``perturbkit workflow-crate --out OUT/workflow``, which the workflow's aggregation
    step runs); call it after :func:`write_crate`. Returns whether the run crate now points at the workflow.

    The workflow crate's main entity (``folder/Snakefile``) becomes the run crate's ``mainEntity`` and the
    run's ``instrument``, with the inputs and language its crate gives it; the config as run (``config.toml``)
    stays described as before and is the run's value of the workflow's ``bench`` input; ``folder/`` is a
    Dataset conforming to the Workflow RO-Crate profile, whose files are inputs of the run, not results.
    """
    out = Path(out)
    sub = out / folder
    if not (sub / METADATA).is_file() or not (out / METADATA).is_file():
        return False
    crate = json.loads((out / METADATA).read_text())
    graph = {e["@id"]: e for e in crate["@graph"]}
    wgraph = {e["@id"]: e for e in json.loads((sub / METADATA).read_text())["@graph"]}
    wroot = wgraph[wgraph[METADATA]["about"]["@id"]]
    prefix = f"{folder}/"
    main_id = prefix + wroot["mainEntity"]["@id"]
    root = graph["./"]
    config_id = root["mainEntity"]["@id"]
    if main_id not in graph or config_id == main_id:
        return config_id == main_id
    action = next(e for e in graph.values() if e.get("@type") == "CreateAction"
                  and e.get("instrument", {}).get("@id") == config_id)

    def ids(value) -> list[dict]:
        return value if isinstance(value, list) else [] if value is None else [value]

    # the workflow's files are what ran, not what the run made
    action["result"] = [r for r in ids(action.get("result")) if not r["@id"].startswith(prefix)]
    kept = []
    for ref in ids(graph[config_id].get("output")):
        fp = graph[ref["@id"]]
        examples = [x for x in ids(fp.get("workExample")) if not x["@id"].startswith(prefix)]
        if examples:
            fp["workExample"] = examples[0] if len(examples) == 1 else examples
            kept.append(ref)
        else:
            del graph[ref["@id"]]
    graph[config_id]["output"] = kept
    for eid, entity in graph.items():
        if eid.startswith(prefix):
            entity.pop("exampleOfWork", None)

    # the workflow's main entity, as its crate describes it (ids of its parameters prefixed: no clashes)
    def moved(ref: dict) -> dict:
        return {"@id": ref["@id"].replace("#", "#workflow-", 1) if ref["@id"].startswith("#") else ref["@id"]}

    src = wgraph[wroot["mainEntity"]["@id"]]
    main = graph[main_id]
    main.update({k: src[k] for k in ("@type", "name", "description", "version", "encodingFormat") if k in src})
    lang = src.get("programmingLanguage")
    if lang:
        graph.setdefault(lang["@id"], dict(wgraph[lang["@id"]]))
        main["programmingLanguage"] = lang
    for key in ("input", "output"):
        refs = []
        for ref in ids(src.get(key)):
            new = moved(ref)
            graph[new["@id"]] = {**wgraph[ref["@id"]], "@id": new["@id"]}
            refs.append(new)
        main[key] = refs
    bench_param = "#workflow-param-bench"
    if bench_param in graph:
        graph[bench_param]["workExample"] = {"@id": config_id}
        graph[config_id]["exampleOfWork"] = {"@id": bench_param}
        action["object"] = [{"@id": config_id}, *[o for o in ids(action.get("object")) if o["@id"] != config_id]]
    graph[prefix] = {"@id": prefix, "@type": "Dataset", "name": wroot.get("name", folder),
                     "description": "the workflow that ran, as its Workflow RO-Crate",
                     "conformsTo": {"@id": WORKFLOW_PROFILE}, "subjectOf": {"@id": prefix + METADATA},
                     "hasPart": [{"@id": eid} for eid in graph if eid.startswith(prefix) and eid != prefix]}
    root["hasPart"] = [*ids(root.get("hasPart")), {"@id": prefix}]
    root["mainEntity"] = {"@id": main_id}
    action["instrument"] = {"@id": main_id}
    crate["@graph"] = list(graph.values())
    from . import _io

    _io.atomic_write_text(out / METADATA, json.dumps(crate, indent=2) + "\n")
    return True


# =========================================================================== what every record holds

#: the libraries whose versions shape the numbers (recorded in every record)
LIBRARIES = ("numpy", "scipy", "pandas", "anndata", "scanpy", "scikit-learn", "torch", "pot", "h5py", "matplotlib")

_VERSIONS: dict[str, str] = {}


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of Python, perturbkit and the libraries that shape the numbers (looked up once per process)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    for dist in (*LIBRARIES, *extra):
        if dist not in _VERSIONS:
            try:
                _VERSIONS[dist] = version(dist)
            except PackageNotFoundError:
                _VERSIONS[dist] = "not installed"
    return {"python": platform.python_version(), "perturbkit": __version__,
            **{d: _VERSIONS[d] for d in (*LIBRARIES, *extra)}}


def platform_info() -> dict[str, str]:
    return {"system": platform.platform(), "machine": platform.machine(), "processor": platform.processor()}


