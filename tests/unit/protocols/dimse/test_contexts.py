"""Presentation contexts per allowed service (protocols/dimse/contexts.py): a peer is offered only what
it is allowed, in the order of transfer syntaxes it prefers, and C-GET's storage contexts carry roles."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from safepacs.protocols.dimse.contexts import (
    FIND_MODELS,
    GET_MODELS,
    MOVE_MODELS,
    Verification,
    contexts_for,
    negotiable_contexts,
    storage_sop_classes,
)
from safepacs.types import QueryModel, Service

CT = "1.2.840.10008.5.1.4.1.1.2"
RETIRED_US = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired)
UNCOMPRESSED = [str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian)]


@dataclass
class Proposed:
    """A presentation context as a requestor proposes it (what pynetdicom hands the acceptor)."""

    abstract_syntax: str
    transfer_syntax: list[str]


def syntaxes(allow: frozenset[Service]) -> set[str]:
    return {str(cx.abstract_syntax) for cx in contexts_for(allow)}


def test_the_query_retrieve_models_are_the_ps3_4_c6_uids() -> None:
    assert FIND_MODELS == {
        "1.2.840.10008.5.1.4.1.2.1.1": QueryModel.PATIENT_ROOT,
        "1.2.840.10008.5.1.4.1.2.2.1": QueryModel.STUDY_ROOT,
    }
    assert (
        set(MOVE_MODELS.values())
        == set(GET_MODELS.values())
        == {QueryModel.PATIENT_ROOT, QueryModel.STUDY_ROOT}
    )
    assert all(uid.endswith(".2") for uid in MOVE_MODELS) and all(uid.endswith(".3") for uid in GET_MODELS)


def test_an_echo_only_peer_is_offered_verification_alone() -> None:
    (cx,) = contexts_for(frozenset({Service.ECHO}))
    assert str(cx.abstract_syntax) == Verification == "1.2.840.10008.1.1"
    assert [str(ts) for ts in cx.transfer_syntax] == UNCOMPRESSED


def test_nothing_allowed_is_nothing_offered() -> None:
    assert contexts_for(frozenset()) == ()


def test_find_only_offers_no_storage_and_no_retrieve() -> None:
    assert syntaxes(frozenset({Service.FIND})) == set(FIND_MODELS)


def test_store_offers_every_storage_class_with_every_transfer_syntax_and_no_roles() -> None:
    offered = contexts_for(frozenset({Service.STORE}))
    ct = next(cx for cx in offered if str(cx.abstract_syntax) == CT)
    assert str(JPEG2000Lossless) in ct.transfer_syntax and str(ExplicitVRBigEndian) in ct.transfer_syntax
    assert ct.scu_role is None and ct.scp_role is None
    assert {str(cx.abstract_syntax) for cx in offered} == set(storage_sop_classes())


def test_get_offers_storage_with_scp_role_selection_even_without_store() -> None:
    offered = contexts_for(frozenset({Service.GET}))
    uids = {str(cx.abstract_syntax) for cx in offered}
    assert set(GET_MODELS) <= uids and CT in uids
    assert not uids & set(MOVE_MODELS) and not uids & set(FIND_MODELS)
    ct = next(cx for cx in offered if str(cx.abstract_syntax) == CT)
    assert ct.scu_role is True and ct.scp_role is True


def test_retired_storage_classes_are_still_accepted() -> None:
    classes = storage_sop_classes()
    assert RETIRED_US in classes and CT in classes
    assert len(classes) == len(set(classes))


def test_the_requestors_preferred_syntax_comes_first() -> None:
    proposed = [Proposed(CT, [str(JPEGLSLossless), str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)])]
    (cx,) = negotiable_contexts(frozenset({Service.STORE}), proposed)
    assert [str(ts) for ts in cx.transfer_syntax] == [
        str(JPEGLSLossless),
        str(ExplicitVRLittleEndian),
        str(ImplicitVRLittleEndian),
    ]


def test_contexts_not_allowed_are_not_negotiated() -> None:
    proposed = [Proposed(CT, UNCOMPRESSED), Proposed(Verification, UNCOMPRESSED)]
    out = negotiable_contexts(frozenset({Service.ECHO}), proposed)
    assert [str(cx.abstract_syntax) for cx in out] == [Verification]


def test_only_supported_syntaxes_are_kept_and_each_once() -> None:
    proposed = [
        Proposed(Verification, ["1.2.3.4.5", str(ExplicitVRLittleEndian)]),
        Proposed(Verification, [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]),
    ]
    (cx,) = negotiable_contexts(frozenset({Service.ECHO}), proposed)
    assert [str(ts) for ts in cx.transfer_syntax] == [
        str(ExplicitVRLittleEndian),
        str(ImplicitVRLittleEndian),
    ]


def test_an_unsupported_syntax_alone_falls_back_to_the_acceptors_list() -> None:
    (cx,) = negotiable_contexts(frozenset({Service.ECHO}), [Proposed(Verification, ["1.2.3.4.5"])])
    assert [str(ts) for ts in cx.transfer_syntax] == UNCOMPRESSED  # the association then rejects it


def test_for_c_get_sending_uncompressed_then_producible_syntaxes_come_first() -> None:
    proposed = [
        Proposed(
            CT,
            [
                str(JPEGBaseline8Bit),  # lossy: cannot be produced, so last
                str(JPEG2000Lossless),
                str(ImplicitVRLittleEndian),
                str(RLELossless),
                str(ExplicitVRLittleEndian),
            ],
        )
    ]
    (cx,) = negotiable_contexts(frozenset({Service.GET}), proposed, retrieving={CT})
    order = [str(ts) for ts in cx.transfer_syntax]
    assert order[:2] == [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
    assert order[-1] == str(JPEGBaseline8Bit)
    assert set(order[2:4]) == {str(JPEG2000Lossless), str(RLELossless)}
    assert cx.scu_role is True and cx.scp_role is True


def test_when_storing_the_requestors_order_is_kept_even_for_a_get_peer() -> None:
    order = [str(JPEGBaseline8Bit), str(ExplicitVRLittleEndian)]
    (cx,) = negotiable_contexts(frozenset({Service.GET, Service.STORE}), [Proposed(CT, order)], retrieving=())
    assert [str(ts) for ts in cx.transfer_syntax] == order


def test_deflate_is_a_storage_syntax() -> None:
    (cx,) = negotiable_contexts(
        frozenset({Service.STORE}), [Proposed(CT, [str(DeflatedExplicitVRLittleEndian)])]
    )
    assert [str(ts) for ts in cx.transfer_syntax] == [str(DeflatedExplicitVRLittleEndian)]
