"""English and Vietnamese strings of the screening programme pages: the referral list, the
referral slip, the daily figures and the TB threshold in force (merged into ``i18n.STRINGS``).
"""
from __future__ import annotations

SCREENING_STRINGS: dict[str, dict[str, str]] = {
    "en": {
        "nav_referrals": "Referrals", "nav_figures": "Figures",
        "referrals_title": "People referred for TB testing",
        "referrals_none": "Nobody was referred on these days.",
        "date_from": "From", "date_to": "To", "show": "Show", "today": "Today",
        "export_csv": "Export CSV", "slip": "Referral slip", "reasons": "Reasons",
        "room": "Room / van", "count_referred": "{n} people referred",
        "slip_title": "REFERRAL FOR TB TESTING",
        "slip_intro": "The chest X-ray of this person was screened by the AI system and shows signs "
                      "that need a confirmatory TB test.",
        "slip_instructions": "Please take this slip to the TB testing site for a sputum test "
                             "(Xpert MTB/RIF) as soon as possible, and bring your ID card.",
        "slip_not_diagnosis": "This is a screening result, not a diagnosis.",
        "slip_xray_time": "X-ray taken", "slip_facility": "Screening site",
        "slip_signature": "X-ray technician (name, signature)", "slip_date": "Date",
        "slip_lab_part": "For the TB testing site: confirmatory result",
        "slip_lab_result": "Result", "slip_print": "Print / save as PDF",
        "threshold_in_force": "TB threshold in force",
        "source_calibration": "calibrated on {date} from {people} people ({positives} with TB), "
                              "{rule}",
        "source_config": "set in the configuration file",
        "source_manifest": "the model's default",
        "source_unknown": "unknown (no TB model)",
        "rule_target_sensitivity": "target sensitivity {value}",
        "rule_max_referral_rate": "at most {value} referred",
        "expected_rate": "expected TB-positive rate {rate} ({lower}–{upper})",
        "pending_calibration": "A newer calibration ({date}, threshold {threshold}) takes effect when "
                               "the service is restarted.",
        "figures_title": "Screening figures",
        "figures_total": "Whole period", "figures_by_day": "Per day", "figures_by_ae": "Per room / van",
        "figures_by_day_ae": "Per day and room / van",
        "day": "Day", "fig_received": "Received", "fig_analyzed": "Analysed", "fig_skipped": "Not analysed",
        "fig_failed": "Failed", "fig_referred": "Referred", "fig_rate": "Referral rate",
        "fig_nodules": "Nodules or masses flagged",
        "rate_outside_band": "The TB-positive rate of this period ({rate}) is outside the rate the "
                             "calibration expects ({lower}–{upper}): check the X-ray settings, the "
                             "population screened, or calibrate again.",
        "bad_range": "Invalid dates: {error}",
        "tb_name": "Tuberculosis",
    },
    "vi": {
        "nav_referrals": "Chuyển tuyến", "nav_figures": "Số liệu",
        "referrals_title": "Người được chuyển xét nghiệm lao",
        "referrals_none": "Không có ai được chuyển tuyến trong những ngày này.",
        "date_from": "Từ ngày", "date_to": "Đến ngày", "show": "Xem", "today": "Hôm nay",
        "export_csv": "Xuất CSV", "slip": "Phiếu chuyển", "reasons": "Lý do",
        "room": "Phòng / xe chụp", "count_referred": "{n} người được chuyển tuyến",
        "slip_title": "PHIẾU CHUYỂN XÉT NGHIỆM LAO",
        "slip_intro": "Phim X-quang ngực của người này đã được hệ thống AI sàng lọc và có dấu hiệu "
                      "cần làm xét nghiệm khẳng định bệnh lao.",
        "slip_instructions": "Vui lòng mang phiếu này đến cơ sở xét nghiệm lao để xét nghiệm đờm "
                             "(Xpert MTB/RIF) càng sớm càng tốt, nhớ mang theo căn cước công dân.",
        "slip_not_diagnosis": "Đây là kết quả sàng lọc, không phải chẩn đoán.",
        "slip_xray_time": "Thời điểm chụp X-quang", "slip_facility": "Nơi sàng lọc",
        "slip_signature": "Kỹ thuật viên X-quang (họ tên, chữ ký)", "slip_date": "Ngày",
        "slip_lab_part": "Dành cho cơ sở xét nghiệm lao: kết quả xét nghiệm khẳng định",
        "slip_lab_result": "Kết quả", "slip_print": "In / lưu thành PDF",
        "threshold_in_force": "Ngưỡng lao đang dùng",
        "source_calibration": "hiệu chỉnh ngày {date} trên {people} người ({positives} người mắc lao), "
                              "{rule}",
        "source_config": "đặt trong tệp cấu hình",
        "source_manifest": "mặc định của mô hình",
        "source_unknown": "không rõ (không có mô hình lao)",
        "rule_target_sensitivity": "độ nhạy mục tiêu {value}",
        "rule_max_referral_rate": "chuyển tuyến tối đa {value}",
        "expected_rate": "tỷ lệ dương tính lao dự kiến {rate} ({lower}–{upper})",
        "pending_calibration": "Một lần hiệu chỉnh mới hơn (ngày {date}, ngưỡng {threshold}) sẽ có "
                               "hiệu lực khi khởi động lại dịch vụ.",
        "figures_title": "Số liệu sàng lọc",
        "figures_total": "Cả giai đoạn", "figures_by_day": "Theo ngày", "figures_by_ae": "Theo phòng / xe chụp",
        "figures_by_day_ae": "Theo ngày và phòng / xe chụp",
        "day": "Ngày", "fig_received": "Đã nhận", "fig_analyzed": "Đã phân tích", "fig_skipped": "Không phân tích",
        "fig_failed": "Lỗi", "fig_referred": "Chuyển tuyến", "fig_rate": "Tỷ lệ chuyển tuyến",
        "fig_nodules": "Có nốt / khối phổi",
        "rate_outside_band": "Tỷ lệ dương tính lao của giai đoạn này ({rate}) nằm ngoài khoảng mà lần "
                             "hiệu chỉnh dự kiến ({lower}–{upper}): hãy kiểm tra cài đặt máy X-quang, "
                             "nhóm người được sàng lọc, hoặc hiệu chỉnh lại.",
        "bad_range": "Ngày không hợp lệ: {error}",
        "tb_name": "Lao",
    },
}
