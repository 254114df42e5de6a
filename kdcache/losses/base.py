"""The `DistillLoss` base class: hyperparameter handling, input checks, logging parts."""

from kdcache.errors import KdcacheError


class DistillLoss:
    """One distillation objective.

    Subclasses set `name`, `views` (view slots needed per step; `student_logits` and
    `teacher_logits` are lists indexed like it), `needs_teacher`, `defaults` (the
    hyperparameters with their CIFAR-100 defaults), `temperature` (which of them softens
    the teacher, if one does) and implement `compute`.
    """

    name: str = ""
    views: tuple[str, ...] = ("weak",)
    needs_teacher: bool = True
    defaults: dict[str, float | int] = {}
    positive: tuple[str, ...] = ()  # hyperparameters that must be > 0 (temperatures, eps)
    temperature: str | None = None  # the hyperparameter that softens the teacher, if any

    def __init__(self, **overrides):
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            valid = ", ".join(self.defaults) or "none"
            raise KdcacheError(
                f"loss '{self.name}' has no hyperparameter {', '.join(unknown)}; valid: {valid}"
            )
        self.params = dict(self.defaults)
        for key, value in overrides.items():
            kind = type(self.defaults[key])
            try:
                self.params[key] = kind(value)
            except (TypeError, ValueError):
                raise KdcacheError(
                    f"loss '{self.name}': {key}={value!r} is not a valid {kind.__name__}"
                ) from None
        for key in self.positive:
            if not self.params[key] > 0:
                raise KdcacheError(f"loss '{self.name}': {key} must be > 0, got {self.params[key]}")

    @property
    def needs_full_distribution(self) -> bool:
        """True when the loss softens the teacher at a temperature above 1: much of the
        softened mass then lies outside the classes a top-k store keeps, and the loss's
        gradients change (docs/store-format.md, "Top-k and the losses")."""
        return self.temperature is not None and self.params[self.temperature] > 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"

    def __call__(self, student_logits, teacher_logits, labels, epoch):
        """Return `(scalar loss, {part: detached scalar tensor})`; logits are computed on in float32.

        The parts stay on the device: reading them is the caller's one sync, when it wants."""
        if len(student_logits) != len(self.views):
            raise KdcacheError(
                f"loss '{self.name}' needs student logits for views {self.views}, "
                f"got {len(student_logits)}"
            )
        if self.needs_teacher and (teacher_logits is None or len(teacher_logits) != len(self.views)):
            raise KdcacheError(
                f"loss '{self.name}' needs teacher logits for views {self.views}; "
                "use a logit store that has them"
            )
        zs = [z.float() for z in student_logits]
        # The teacher is a fixed target: cached logits, or live ones that must not be trained.
        zt = None if teacher_logits is None else [z.detach().float() for z in teacher_logits]
        loss, parts = self.compute(zs, zt, labels, epoch)
        return loss, {name: part.detach() for name, part in parts.items()}

    def compute(self, zs, zt, labels, epoch):
        """Return `(loss, {part: scalar tensor})`; implemented by each loss."""
        raise NotImplementedError

    def accuracy_logits(self, student_logits):
        """The student logits to report training accuracy from: the weak view."""
        return student_logits[self.views.index("weak")]

