from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LatteOrder(_message.Message):
    __slots__ = ("milk_ml", "shots", "syrup", "name")
    MILK_ML_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    SYRUP_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    milk_ml: int
    shots: int
    syrup: str
    name: str
    def __init__(self, milk_ml: _Optional[int] = ..., shots: _Optional[int] = ..., syrup: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class Latte(_message.Message):
    __slots__ = ("description", "temperature_c", "order_id")
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    description: str
    temperature_c: int
    order_id: int
    def __init__(self, description: _Optional[str] = ..., temperature_c: _Optional[int] = ..., order_id: _Optional[int] = ...) -> None: ...

class BrewStatus(_message.Message):
    __slots__ = ("stage", "progress_percent")
    class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STAGE_UNSPECIFIED: _ClassVar[BrewStatus.Stage]
        GRINDING: _ClassVar[BrewStatus.Stage]
        EXTRACTING: _ClassVar[BrewStatus.Stage]
        STEAMING: _ClassVar[BrewStatus.Stage]
        POURING: _ClassVar[BrewStatus.Stage]
        DONE: _ClassVar[BrewStatus.Stage]
    STAGE_UNSPECIFIED: BrewStatus.Stage
    GRINDING: BrewStatus.Stage
    EXTRACTING: BrewStatus.Stage
    STEAMING: BrewStatus.Stage
    POURING: BrewStatus.Stage
    DONE: BrewStatus.Stage
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_PERCENT_FIELD_NUMBER: _ClassVar[int]
    stage: BrewStatus.Stage
    progress_percent: int
    def __init__(self, stage: _Optional[_Union[BrewStatus.Stage, str]] = ..., progress_percent: _Optional[int] = ...) -> None: ...

class OrderSummary(_message.Message):
    __slots__ = ("drinks", "total_shots", "order_ids")
    DRINKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SHOTS_FIELD_NUMBER: _ClassVar[int]
    ORDER_IDS_FIELD_NUMBER: _ClassVar[int]
    drinks: int
    total_shots: int
    order_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, drinks: _Optional[int] = ..., total_shots: _Optional[int] = ..., order_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TastingNote(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...
