"""English and Vietnamese strings of the status page, and the choice between them.

Order of choice: ``web.language`` when it is not "auto", then the ``lang`` cookie set by
the switch on the page, then the browser's Accept-Language, then English.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from flask import Request

logger = logging.getLogger(__name__)

LANGUAGES = ("en", "vi")
LANGUAGE_NAMES = {"en": "English", "vi": "Tiếng Việt"}
COOKIE = "lang"

STRINGS: dict[str, dict[str, str]] = {
    "en": {
        "title": "X-ray AI status",
        "refer": "REFER for TB testing",
        "refer_for": "REFER: {reasons}",
        "refer_also": "Also refer for: {reasons}",
        "other_findings": "Other findings",
        "finding": "Finding", "result": "Result",
        "positive": "positive", "negative": "negative", "refers": "refer",
        "none_found": "none found",
        "no_signs": "No TB signs",
        "skipped": "Not analyzed",
        "failed": "Analysis failed",
        "analyzing": "Analyzing…",
        "received": "Waiting for analysis…",
        "no_tb_result": "No TB result",
        "tb_score": "TB score",
        "threshold": "threshold",
        "nodules": "Nodules / masses",
        "patient": "Patient",
        "patient_id": "ID",
        "time": "Time",
        "state": "State",
        "results_to_pacs": "Results to PACS",
        "image_to_pacs": "Image forwarded to PACS",
        "recent": "Recent images",
        "timings": "Timings (ms)",
        "details": "Details",
        "back": "Back to the list",
        "findings": "Findings",
        "score": "score",
        "diameter": "diameter",
        "no_images": "No images received yet. Send an image from the X-ray console.",
        "demo_warning": "Demonstration models: not for diagnosis",
        "connection_lost": "Connection to the box lost, retrying…",
        "state_received": "received", "state_analyzing": "analyzing", "state_analyzed": "analyzed",
        "state_skipped": "skipped", "state_failed": "failed",
        "delivery_none": "not queued", "delivery_pending": "waiting to send",
        "delivery_retrying": "retrying", "delivery_sent": "sent", "delivery_gave_up": "GAVE UP",
        "delivery_superseded": "replaced, not sent",
        "conflict_note": "This image was received {n} more time(s) with different content under "
                         "the same UID. Every version is kept; the latest one is analysed and its "
                         "results replace the earlier ones.",
        "replaced_results": "Replaced results (earlier analyses of this image)",
        "notices": "Notices",
        "workers": "Analysis workers", "stalled": "STALLED",
        "system": "System",
        "listener": "DICOM receiver",
        "up": "running", "down": "DOWN",
        "reachable": "reachable", "unreachable": "UNREACHABLE", "checking": "checking…",
        "destinations": "PACS destinations",
        "analysis_queue": "Waiting for analysis",
        "delivery_queue": "Waiting to send",
        "oldest_unsent": "Oldest unsent result",
        "gave_up_count": "Results given up",
        "commitments_waiting": "Storage commitment results to send",
        "commitments_gave_up": "Storage commitment results never delivered",
        "disk_free": "Disk free", "disk_low": "DISK LOW",
        "models": "Models", "temperature": "Temperature", "gpu_load": "GPU load",
        "all_ok": "All systems normal", "problems": "Needs attention",
        "resend": "Resend results", "reanalyze": "Analyze again", "retry": "Retry now",
        "resent": "Results queued to be sent again ({n} objects).",
        "requeued": "Image queued to be analyzed again.",
        "retried": "The delivery will be retried now.",
        "nothing_done": "Nothing to do: the image is still being processed.",
        "destination": "Destination", "object": "Object", "attempts": "Attempts", "forward_rule": "rule",
        "last_error": "Last error",
        "login": "Log in", "logout": "Log out", "password": "Password",
        "login_failed": "Wrong password.",
        "login_blocked": "Too many wrong passwords. Wait 5 minutes and try again.",
        "not_found": "No such image in the journal.",
        "reason_lateral_view": "lateral view", "reason_wrong_modality": "not a CR/DX X-ray",
        "reason_not_chest": "not a chest image", "reason_view_position": "view is not PA/AP",
        "reason_patient_age": "patient below the minimum age",
        "reason_image_too_small": "image too small", "reason_image_too_large": "image too large",
        "reason_multi_frame": "multi-frame image", "reason_unsupported_pixels": "unsupported pixel format",
        "reason_not_an_image": "not an image", "reason_duplicate": "duplicate image",
    },
    "vi": {
        "title": "Trạng thái AI X-quang",
        "refer": "CHUYỂN XÉT NGHIỆM LAO",
        "refer_for": "CHUYỂN TUYẾN: {reasons}",
        "refer_also": "Cũng chuyển tuyến vì: {reasons}",
        "other_findings": "Phát hiện khác",
        "finding": "Phát hiện", "result": "Kết quả",
        "positive": "dương tính", "negative": "âm tính", "refers": "chuyển tuyến",
        "none_found": "không phát hiện",
        "no_signs": "Không có dấu hiệu lao",
        "skipped": "Không phân tích",
        "failed": "Phân tích thất bại",
        "analyzing": "Đang phân tích…",
        "received": "Đang chờ phân tích…",
        "no_tb_result": "Không có kết quả lao",
        "tb_score": "Điểm nguy cơ lao",
        "threshold": "ngưỡng",
        "nodules": "Nốt / khối phổi",
        "patient": "Bệnh nhân",
        "patient_id": "Mã BN",
        "time": "Thời gian",
        "state": "Trạng thái",
        "results_to_pacs": "Gửi kết quả lên PACS",
        "image_to_pacs": "Chuyển ảnh gốc lên PACS",
        "recent": "Ảnh gần đây",
        "timings": "Thời gian xử lý (ms)",
        "details": "Chi tiết",
        "back": "Quay lại danh sách",
        "findings": "Kết quả phân tích",
        "score": "điểm",
        "diameter": "đường kính",
        "no_images": "Chưa nhận được ảnh nào. Hãy gửi ảnh từ máy X-quang.",
        "demo_warning": "Mô hình trình diễn: không dùng để chẩn đoán",
        "connection_lost": "Mất kết nối với thiết bị, đang thử lại…",
        "state_received": "đã nhận", "state_analyzing": "đang phân tích", "state_analyzed": "đã phân tích",
        "state_skipped": "bỏ qua", "state_failed": "lỗi",
        "delivery_none": "chưa xếp hàng", "delivery_pending": "đang chờ gửi",
        "delivery_retrying": "đang thử gửi lại", "delivery_sent": "đã gửi",
        "delivery_gave_up": "ĐÃ NGỪNG GỬI",
        "delivery_superseded": "đã thay thế, không gửi",
        "conflict_note": "Ảnh này đã được nhận thêm {n} lần với nội dung khác nhưng cùng UID. "
                         "Mọi phiên bản đều được lưu; phiên bản mới nhất được phân tích và kết quả "
                         "của nó thay thế kết quả trước.",
        "replaced_results": "Kết quả đã được thay thế (các lần phân tích trước của ảnh này)",
        "notices": "Thông báo",
        "workers": "Tiến trình phân tích", "stalled": "BỊ TREO",
        "system": "Hệ thống",
        "listener": "Bộ nhận DICOM",
        "up": "đang chạy", "down": "NGỪNG HOẠT ĐỘNG",
        "reachable": "kết nối được", "unreachable": "KHÔNG KẾT NỐI ĐƯỢC", "checking": "đang kiểm tra…",
        "destinations": "Máy chủ PACS nhận kết quả",
        "analysis_queue": "Chờ phân tích",
        "delivery_queue": "Chờ gửi",
        "oldest_unsent": "Kết quả chưa gửi lâu nhất",
        "gave_up_count": "Kết quả đã ngừng gửi",
        "commitments_waiting": "Xác nhận lưu trữ chờ gửi",
        "commitments_gave_up": "Xác nhận lưu trữ không gửi được",
        "disk_free": "Dung lượng trống", "disk_low": "SẮP HẾT DUNG LƯỢNG",
        "models": "Mô hình", "temperature": "Nhiệt độ", "gpu_load": "Tải GPU",
        "all_ok": "Hệ thống hoạt động bình thường", "problems": "Cần kiểm tra",
        "resend": "Gửi lại kết quả", "reanalyze": "Phân tích lại", "retry": "Thử gửi lại ngay",
        "resent": "Đã xếp hàng gửi lại kết quả ({n} đối tượng).",
        "requeued": "Ảnh đã được xếp hàng để phân tích lại.",
        "retried": "Kết quả sẽ được gửi lại ngay.",
        "nothing_done": "Chưa thể thực hiện: ảnh vẫn đang được xử lý.",
        "destination": "Nơi nhận", "object": "Đối tượng", "attempts": "Số lần thử", "forward_rule": "quy tắc",
        "last_error": "Lỗi gần nhất",
        "login": "Đăng nhập", "logout": "Đăng xuất", "password": "Mật khẩu",
        "login_failed": "Sai mật khẩu.",
        "login_blocked": "Nhập sai mật khẩu quá nhiều lần. Vui lòng đợi 5 phút rồi thử lại.",
        "not_found": "Không tìm thấy ảnh này trong nhật ký.",
        "reason_lateral_view": "phim chụp nghiêng", "reason_wrong_modality": "không phải ảnh X-quang CR/DX",
        "reason_not_chest": "không phải ảnh ngực", "reason_view_position": "tư thế chụp không phải PA/AP",
        "reason_patient_age": "bệnh nhân dưới độ tuổi tối thiểu",
        "reason_image_too_small": "ảnh quá nhỏ", "reason_image_too_large": "ảnh quá lớn",
        "reason_multi_frame": "ảnh nhiều khung hình",
        "reason_unsupported_pixels": "định dạng điểm ảnh không được hỗ trợ",
        "reason_not_an_image": "không phải ảnh", "reason_duplicate": "ảnh trùng lặp",
    },
}


# The screening programme pages keep their strings in their own module.
from .i18n_screening import SCREENING_STRINGS  # noqa: E402

for _lang, _table in SCREENING_STRINGS.items():
    STRINGS[_lang].update({k: v for k, v in _table.items() if k not in STRINGS[_lang]})


def translator(lang: str):
    """A function ``t(key, **kw)`` for one language; unknown keys fall back to English."""
    table = STRINGS.get(lang, STRINGS["en"])

    def t(key: str, **kwargs: object) -> str:
        text = table.get(key) or STRINGS["en"].get(key)
        if text is None:
            logger.warning("i18n: no string for key %r", key)
            return key
        return text.format(**kwargs) if kwargs else text

    return t


def _from_accept_language(header: str) -> str | None:
    """Best of our languages in an Accept-Language header (q-values honoured)."""
    best, best_q = None, 0.0
    for part in header.split(","):
        piece = part.strip()
        if not piece:
            continue
        tag, _, params = piece.partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        primary = tag.strip().lower().split("-")[0]
        if primary in LANGUAGES and q > best_q:
            best, best_q = primary, q
    return best


def choose_language(configured: str, request: "Request") -> str:
    """The language for this request (see the module docstring for the order)."""
    if configured in LANGUAGES:
        return configured
    cookie = request.cookies.get(COOKIE)
    if cookie in LANGUAGES:
        return cookie
    return _from_accept_language(request.headers.get("Accept-Language", "")) or "en"


def reason_text(t, reason: str | None) -> str:
    """A skip/fail reason in the page's language when its category is known, else as is."""
    from edge.metrics import skip_reason_category

    category = skip_reason_category(reason)
    if category != "other":
        return t(f"reason_{category}")
    return reason or ""
