"""Marshmallow's load by a shorter road for valid input: each field's own deserialisation and
validators, and no errors to write. Anything else takes marshmallow's whole load."""

from typing import ClassVar

from marshmallow import Schema, ValidationError, missing


class FastLoadSchema(Schema):
    """A schema whose load takes the shorter road where that road knows the schema: keys that
    are the fields' names, no ``load_default``, and no hook but those of ``harmless_hooks``."""

    # Hook names by tag ("pre_load": [...]) that change nothing when every key is a field's name.
    harmless_hooks: ClassVar[dict[str, list[str]]] = {}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._required = [name for name, field in self.load_fields.items() if field.required]
        hooks = {tag: [hook[0] for hook in found] for tag, found in self._hooks.items() if found}
        self._plain = hooks == self.harmless_hooks and not any(
            field.data_key or field.attribute or field.load_default is not missing
            for field in self.load_fields.values()
        )

    def load(self, data, *, many=None, partial=None, unknown=None):
        """Marshmallow's load, by a shorter road for data whose keys are all known and valid:
        each field's own deserialisation and validators, and no errors to write. Anything else
        (an unknown or missing key, a bad value) takes marshmallow's whole load, which writes
        the errors."""
        if self._plain and many is None and partial is None and unknown is None:
            loaded = self._load_valid(data)
            if loaded is not None:
                return loaded
        return super().load(data, many=many, partial=partial, unknown=unknown)

    def _load_valid(self, data) -> dict | None:
        """The loaded data, as marshmallow's load gives it, or None to take that load."""
        fields_ = self.load_fields
        if not isinstance(data, dict) or not all(key in fields_ for key in data):
            return None
        if not all(name in data for name in self._required):
            return None
        loaded = {}
        try:
            for name, field in fields_.items():  # the fields' order, as marshmallow's load
                if name not in data:
                    continue
                value = data[name]
                if value is not None:
                    value = field._deserialize(value, name, data)
                    for rule in field.validators:
                        if rule(value) is False:
                            return None
                elif not field.allow_none:
                    return None
                loaded[name] = value
        except ValidationError:
            return None
        return loaded
