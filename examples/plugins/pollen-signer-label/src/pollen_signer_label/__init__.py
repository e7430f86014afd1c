"""A Pollen reconciler plugin: keeps a label on each Workload naming who signed its artifact.

A Workload names its artifact by digest or by an Artifact's name; the Artifact says who signed
it. This plugin writes the signer into the label ``example.com/signer`` (made label-safe) and,
in full, into the annotation of the same name, and says so in a ``Signed`` condition: True when
the artifact is signed, False when it is not, Unknown while no Artifact matches. Selectors can
then pick Workloads by signer: ``pctl get workloads -l example.com/signer=release-team``.
"""

from __future__ import annotations

import re
from typing import Final

from pollen.reconcilers import Context, Request, Result
from pollen.resources import DIGEST_RE, Artifact, ConditionStatus, Workload

__all__ = ["SIGNER_KEY", "SignerLabel", "label_value"]

#: The label (signer, label-safe) and the annotation (signer, verbatim) this plugin owns.
SIGNER_KEY: Final = "example.com/signer"
#: The condition this plugin writes on each Workload.
SIGNED_CONDITION: Final = "Signed"
#: An Artifact can change without its Workloads changing; look again this often.
RECHECK_SECONDS: Final = 60.0

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def label_value(signer: str) -> str:
    """``signer`` as a label value: runs of other characters become '-', at most 63
    characters, starting and ending with a letter or digit."""
    value = _UNSAFE.sub("-", signer)[:63].strip("-_.")
    return value or "unknown"


class SignerLabel:
    """Watches Workloads; labels each with its artifact's signer."""

    name = "signer-label"
    kind = "Workload"

    async def reconcile(self, request: Request, context: Context) -> Result:
        """Make the Workload's signer label, annotation and ``Signed`` condition match its
        artifact. Idempotent: when nothing changed it writes nothing."""
        workload = context.get(request.kind, request.name)
        if not isinstance(workload, Workload) or workload.metadata.deletion_timestamp:
            return Result.done()  # gone or going: nothing to label
        reference = workload.spec.artifact
        artifact = _find_artifact(context, reference)
        if artifact is None:
            self._set(context, request, None)
            context.set_condition(
                request.kind,
                request.name,
                SIGNED_CONDITION,
                ConditionStatus.UNKNOWN,
                reason="ArtifactNotFound",
                message=f"no Artifact matches {reference}",
            )
            return Result.requeue_after(RECHECK_SECONDS)
        signer = artifact.spec.signer
        self._set(context, request, signer)
        if signer:
            status, reason = True, "Signed"
            message = f'artifact "{artifact.name}" is signed by {signer}'
        else:
            status, reason = False, "Unsigned"
            message = f'artifact "{artifact.name}" has no signer'
        context.set_condition(
            request.kind, request.name, SIGNED_CONDITION, status, reason=reason, message=message
        )
        if workload.metadata.labels.get(SIGNER_KEY) != (label_value(signer) if signer else None):
            context.log.info("labelled workload %s as signed by %s", request.name, signer)
            context.record_event(
                request.kind,
                request.name,
                "SignerLabelled",
                f"signed by {signer}" if signer else "unsigned: signer label removed",
            )
        return Result.requeue_after(RECHECK_SECONDS)

    @staticmethod
    def _set(context: Context, request: Request, signer: str | None) -> None:
        context.patch(
            request.kind,
            request.name,
            labels={SIGNER_KEY: label_value(signer) if signer else None},
            annotations={SIGNER_KEY: signer or None},
        )


def _find_artifact(context: Context, reference: str) -> Artifact | None:
    """The Artifact a Workload's ``spec.artifact`` names: by digest, else by name."""
    if DIGEST_RE.fullmatch(reference):
        for candidate in context.list("Artifact"):
            if isinstance(candidate, Artifact) and candidate.spec.digest == reference:
                return candidate
        return None
    found = context.get("Artifact", reference)
    return found if isinstance(found, Artifact) else None
