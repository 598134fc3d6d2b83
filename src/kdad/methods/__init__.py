"""kdad methods: one LightningModule per paper on the shared :class:`AnomalyModule` base."""

from kdad.methods.adps import AsymmetricDistillationPostSegmentation
from kdad.methods.base import AnomalyModule, AnomalyOutput
from kdad.methods.dskd import DualStudentKD
from kdad.methods.rd import ReverseDistillation
from kdad.methods.tdad import TridentDistillation
from kdad.methods.urd import UnlockedReverseDistillation

METHODS: dict[str, type[AnomalyModule]] = {
    AsymmetricDistillationPostSegmentation.method_name: AsymmetricDistillationPostSegmentation,
    DualStudentKD.method_name: DualStudentKD,
    ReverseDistillation.method_name: ReverseDistillation,
    TridentDistillation.method_name: TridentDistillation,
    UnlockedReverseDistillation.method_name: UnlockedReverseDistillation,
}

__all__ = [
    "METHODS",
    "AnomalyModule",
    "AnomalyOutput",
    "AsymmetricDistillationPostSegmentation",
    "DualStudentKD",
    "ReverseDistillation",
    "TridentDistillation",
    "UnlockedReverseDistillation",
]
