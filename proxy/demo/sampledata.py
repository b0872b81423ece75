"""The hotel sample database: schema plus realistic, deterministic rows.

Theory of operation
-------------------
Rules, rewrites, masks and guards are only convincing when they are tried on
data that looks like the real thing: Chinese resident ID numbers whose check
digit is right, bank cards that pass Luhn, mobile numbers with real prefixes,
CS texts in Chinese, and timestamps that make "today", "the current shift" and
"the last 72 hours" non-empty whenever the sample is loaded.

Generation is pure Python and separate from loading: :func:`iter_tables`
yields one :class:`Table` at a time (columns + an iterator of row tuples), so
unit tests can inspect rows without a database and the loader can stream
200k rows straight into ``COPY`` without holding them all in memory. Every
table draws from its own ``random.Random`` derived from ``seed``, so the
output depends only on ``seed``, the sizes and ``now``.

:func:`load_sample` runs ``schema.sql`` in two halves around the COPY:
tables first, indexes and foreign keys afterwards (building them once over
loaded data is several times faster than maintaining them row by row).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import importlib.resources
import random
import string
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

__all__ = [
    "POST_LOAD_MARKER",
    "TABLES",
    "Table",
    "iter_tables",
    "load_sample",
    "load_sample_sync",
    "luhn_check_digit",
    "luhn_ok",
    "partition_bounds",
    "partitions_ddl",
    "resident_id_check_digit",
    "resident_id_ok",
    "schema_sql",
]

POST_LOAD_MARKER = "-- pgwarden:post-load"

#: Load order (guests before the tables that reference them).
TABLES: tuple[str, ...] = (
    "guests", "cs_records", "complaint_plans", "disputes", "service_ratings",
    "abnormal_tickets", "crisis_reports", "sys_params", "fault_logs",
    "training_dialogs", "keycard_events",
)

# --------------------------------------------------------------------------
# Check digits
# --------------------------------------------------------------------------

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def resident_id_check_digit(first17: str) -> str:
    """GB 11643-1999 check character (``0-9`` or ``X``) for the first 17 digits.

    Masking and redaction code recognises ID numbers by this digit, so the
    sample must carry valid ones.
    """
    if len(first17) != 17 or not first17.isascii() or not first17.isdigit():
        raise ValueError(f"need exactly 17 digits, got {first17!r}")
    total = sum(int(d) * w for d, w in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11]


def resident_id_ok(number: str) -> bool:
    """Whether an 18-character resident ID number has a valid check character."""
    if len(number) != 18 or not number[:17].isascii() or not number[:17].isdigit():
        return False
    return resident_id_check_digit(number[:17]) == number[17].upper()


def luhn_check_digit(partial: str) -> str:
    """The Luhn digit to append to ``partial`` (bank card numbers)."""
    if not partial.isascii() or not partial.isdigit():
        raise ValueError(f"need digits, got {partial!r}")
    total = 0
    # Walking from the right, the digits of `partial` sit at odd positions of
    # the final number, which are the ones Luhn doubles.
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def luhn_ok(number: str) -> bool:
    """Whether ``number`` (digits only, at least 2) passes the Luhn check."""
    if len(number) < 2 or not number.isascii() or not number.isdigit():
        return False
    return luhn_check_digit(number[:-1]) == number[-1]


# --------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------

# (surname, pinyin, relative frequency)
_SURNAMES: tuple[tuple[str, str, int], ...] = (
    ("王", "wang", 72), ("李", "li", 71), ("张", "zhang", 68), ("刘", "liu", 53),
    ("陈", "chen", 45), ("杨", "yang", 31), ("黄", "huang", 24), ("赵", "zhao", 20),
    ("吴", "wu", 20), ("周", "zhou", 19), ("徐", "xu", 15), ("孙", "sun", 15),
    ("马", "ma", 14), ("朱", "zhu", 13), ("胡", "hu", 12), ("郭", "guo", 11),
    ("何", "he", 10), ("林", "lin", 10), ("高", "gao", 10), ("罗", "luo", 9),
    ("郑", "zheng", 9), ("梁", "liang", 8), ("谢", "xie", 7), ("宋", "song", 7),
    ("唐", "tang", 7), ("许", "xu", 6), ("韩", "han", 6), ("冯", "feng", 6),
    ("邓", "deng", 6), ("曹", "cao", 6), ("彭", "peng", 5), ("曾", "zeng", 5),
    ("萧", "xiao", 5), ("田", "tian", 5), ("董", "dong", 5), ("潘", "pan", 4),
    ("袁", "yuan", 4), ("蔡", "cai", 4), ("蒋", "jiang", 4), ("余", "yu", 4),
    ("欧阳", "ouyang", 1), ("司马", "sima", 1),
)
_GIVEN: tuple[tuple[str, str], ...] = (
    ("伟", "wei"), ("芳", "fang"), ("娜", "na"), ("敏", "min"), ("静", "jing"),
    ("丽", "li"), ("强", "qiang"), ("磊", "lei"), ("军", "jun"), ("洋", "yang"),
    ("勇", "yong"), ("艳", "yan"), ("杰", "jie"), ("娟", "juan"), ("涛", "tao"),
    ("明", "ming"), ("超", "chao"), ("秀", "xiu"), ("霞", "xia"), ("平", "ping"),
    ("刚", "gang"), ("桂", "gui"), ("英", "ying"), ("华", "hua"), ("建", "jian"),
    ("国", "guo"), ("文", "wen"), ("辉", "hui"), ("玲", "ling"), ("鹏", "peng"),
    ("斌", "bin"), ("宇", "yu"), ("浩", "hao"), ("婷", "ting"), ("雪", "xue"),
    ("琳", "lin"), ("晨", "chen"), ("欣", "xin"), ("怡", "yi"), ("佳", "jia"),
    ("子", "zi"), ("涵", "han"), ("梓", "zi"), ("轩", "xuan"), ("睿", "rui"),
    ("博", "bo"), ("思", "si"), ("雨", "yu"), ("嘉", "jia"), ("俊", "jun"),
    ("晓", "xiao"), ("海", "hai"), ("燕", "yan"), ("红", "hong"), ("志", "zhi"),
    ("春", "chun"), ("云", "yun"), ("飞", "fei"), ("宁", "ning"), ("凯", "kai"),
    ("昊", "hao"), ("然", "ran"), ("诗", "shi"), ("瑶", "yao"), ("一", "yi"),
    ("泽", "ze"), ("天", "tian"), ("安", "an"), ("可", "ke"), ("心", "xin"),
)
# Real county-level administrative codes (GB/T 2260).
_REGION_CODES: tuple[str, ...] = (
    "110101", "110102", "110105", "110108", "310101", "310104", "310115",
    "440103", "440106", "440304", "440305", "330102", "330106", "320102",
    "320506", "510104", "510107", "420102", "420106", "500103", "610103",
    "610113", "120101", "370202", "210102", "350203", "430102", "410105",
)
_MOBILE_PREFIXES: tuple[str, ...] = (
    *(f"13{d}" for d in range(10)),
    "150", "151", "152", "153", "155", "156", "157", "158", "159",
    *(f"18{d}" for d in range(10)),
    "191", "193", "195", "196", "197", "198", "199",
)
# (BIN, total length): debit cards of the big Chinese banks are mostly 19 digits.
_CARD_BINS: tuple[tuple[str, int], ...] = (
    ("622202", 19), ("621700", 19), ("622848", 19), ("621661", 19),
    ("622262", 19), ("622700", 19), ("622588", 16), ("621483", 16),
    ("622155", 18), ("625965", 16), ("621226", 19), ("623058", 17),
)
_MAIL_DOMAINS: tuple[str, ...] = ("163.com", "126.com", "qq.com", "sina.com", "gmail.com",
                                  "outlook.com", "foxmail.com", "hotmail.com")

ACCOUNT_MANAGERS: tuple[str, ...] = ("erin", "olivia", "oscar")
REGIONS: tuple[str, ...] = ("east", "north", "south", "west")
DEPARTMENTS: tuple[str, ...] = ("FO", "HK", "FB", "ENG", "SALES")
CATEGORIES: tuple[str, ...] = ("consultation", "complaint", "request", "praise")
CHANNELS: tuple[str, ...] = ("phone", "chat", "ai", "front_desk")

#: Staff usernames per department (alice, anna and bob are front-office demo users).
STAFF: dict[str, tuple[str, ...]] = {
    "FO": ("alice", "anna", "bob", "amy", "andy"),
    "HK": ("hannah", "henry", "helen"),
    "FB": ("frank", "fiona", "felix"),
    "ENG": ("eric", "ethan", "emma"),
    "SALES": ("sam", "sophia", "steve"),
}
_DEPT_WEIGHTS = (34, 20, 20, 14, 12)  # FO well represented
# consultation, complaint, request, praise per department
_CATEGORY_WEIGHTS: dict[str, tuple[int, ...]] = {
    "FO": (35, 25, 30, 10), "HK": (15, 35, 40, 10), "FB": (25, 30, 35, 10),
    "ENG": (10, 45, 40, 5), "SALES": (65, 10, 20, 5),
}
# phone, chat, ai, front_desk per department
_CHANNEL_WEIGHTS: dict[str, tuple[int, ...]] = {
    "FO": (25, 15, 15, 45), "HK": (45, 25, 20, 10), "FB": (40, 25, 20, 15),
    "ENG": (50, 25, 20, 5), "SALES": (45, 35, 15, 5),
}

_DISHES = ("宫保鸡丁", "清蒸鲈鱼", "扬州炒饭", "黑椒牛排", "意大利面", "小笼包", "北京烤鸭",
           "麻婆豆腐", "凯撒沙拉", "虾饺", "红烧肉", "鲜榨橙汁")
_DAYS = ("明天", "后天", "本周六", "本周日", "下周一", "今晚")

_TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("FO", "consultation"): (
        "客人咨询退房时间能否延迟至{hour}点，已告知需视房态确认。",
        "客人来电咨询机场接送服务价格，已发送报价。",
        "客人咨询早餐时间及地点，已告知6:30-10:30在二楼自助餐厅。",
        "客人询问周边地铁站及景点路线，已提供交通指引。",
        "客人咨询发票抬头变更事宜，已说明办理流程。",
        "客人咨询会员积分兑换房晚规则，已详细解释。",
    ),
    ("FO", "complaint"): (
        "客人投诉办理入住等候超过{mins}分钟，已致歉并赠送欢迎饮品。",
        "客人反映预订的大床房被安排为双床房，已协调换房至{room}。",
        "客人投诉押金退款迟迟未到账，已联系财务核查。",
        "客人反映前台员工态度冷淡，已记录并反馈主管。",
        "客人投诉房卡多次失效无法开门，已重新制卡。",
        "客人反映房间空调不制冷，已安排工程部处理。",
    ),
    ("FO", "request"): (
        "客人要求{day}{time}叫醒服务，已登记。",
        "客人申请延迟退房至{hour}点，已批准。",
        "客人需要代订{n}张高铁票，已转礼宾部。",
        "客人要求寄存行李{n}件，已办理。",
        "客人要求将{room}房间续住{n}晚，已办理续住。",
    ),
    ("FO", "praise"): (
        "客人表扬前台办理入住高效热情。",
        "客人在点评中称赞礼宾部行李服务周到。",
        "客人表扬前台主动升级房型，入住体验很好。",
    ),
    ("HK", "consultation"): (
        "客人咨询洗衣服务收费标准及取送时间，已告知。",
        "客人询问房间是否可以携带宠物，已说明酒店政策。",
        "客人咨询是否提供婴儿床，已告知可免费借用。",
    ),
    ("HK", "complaint"): (
        "客人投诉{room}房间卫生间有异味，已安排客房部重新清洁。",
        "客人反映床单有污渍，已更换并致歉。",
        "客人投诉房间未按时打扫，已安排补做。",
        "客人反映{room}房间隔壁噪音大影响休息，已协调换房。",
        "客人投诉房间内发现头发，已重新清洁并赠送果盘致歉。",
    ),
    ("HK", "request"): (
        "客人需要加床一张，已安排送至{room}房间。",
        "客人要求加送{n}瓶矿泉水和洗漱用品，已送达。",
        "客人要求{time}后请勿打扰，已登记。",
        "客人需要熨斗和烫衣板，已送至{room}房间。",
        "客人要求更换为荞麦枕，已送达。",
    ),
    ("HK", "praise"): (
        "客人表扬客房服务员打扫细致，房间整洁。",
        "客人留言感谢夜床服务贴心。",
    ),
    ("FB", "consultation"): (
        "客人咨询中餐厅营业时间及是否需要预订，已告知。",
        "客人询问早餐是否含素食选项，已说明。",
        "客人咨询{day}下午茶套餐价格，已告知。",
    ),
    ("FB", "complaint"): (
        "客人投诉送餐超时{mins}分钟，菜品已凉，已免单并致歉。",
        "客人反映{dish}口味过咸，已重新制作。",
        "客人投诉餐厅账单多收一份{dish}，已核实退款。",
        "客人在{dish}中发现异物，已致歉并上报餐饮部经理。",
        "客人反映早餐自助餐补菜不及时，已反馈厨房。",
    ),
    ("FB", "request"): (
        "客人预订{day}晚餐包间，{n}位，已确认。",
        "客人要求送餐至{room}房间，点了{dish}，已下单。",
        "客人需要生日蛋糕一个，已安排西饼房制作。",
        "客人要求{dish}少辣少油，已备注厨房。",
    ),
    ("FB", "praise"): (
        "客人表扬中餐厅{dish}味道地道，服务周到。",
        "客人称赞早餐品种丰富。",
    ),
    ("ENG", "consultation"): (
        "客人咨询房间插座是否支持110V电器，已告知可借用转换器。",
        "客人询问房间WiFi密码及网速，已告知。",
    ),
    ("ENG", "complaint"): (
        "客人反映{room}房间空调不制冷，已安排工程部处理。",
        "客人投诉热水忽冷忽热，工程部已检修恒温阀。",
        "客人反映电视无信号，已派工程师上门调试。",
        "客人投诉{room}房间门锁反应迟缓，已更换电池。",
        "客人反映马桶堵塞，工程部已疏通。",
    ),
    ("ENG", "request"): (
        "客人要求维修{room}房间漏水的水龙头，已派单。",
        "客人需要更换房间灯泡，工程部已处理。",
        "客人反映WiFi信号弱，已重启路由器并增设信号放大器。",
        "客人要求调高{room}房间空调温度上限，已调整。",
    ),
    ("ENG", "praise"): (
        "客人表扬工程部响应迅速，{mins}分钟内修好空调。",
    ),
    ("SALES", "consultation"): (
        "客户咨询{month}月会议室租用价格及容量，已发送方案。",
        "客户咨询协议价及年度合作政策，已安排客户经理跟进。",
        "客户询问婚宴套餐及档期，已发送报价单。",
        "客户咨询团队入住{n}间房的折扣，已提供报价。",
        "客户咨询年会场地及餐饮标准，已预约看场。",
    ),
    ("SALES", "complaint"): (
        "客户投诉协议价未生效，已核查并调整账单。",
        "客户反映会议期间投影设备故障，已致歉并减免部分费用。",
        "客户投诉团队房未按约定安排在同一楼层，已协调。",
    ),
    ("SALES", "request"): (
        "客户要求为{n}位参会人员预留房间，已锁定房源。",
        "客户申请开具增值税专用发票，已转财务处理。",
        "客户要求{month}月会议增加茶歇，已确认。",
    ),
    ("SALES", "praise"): (
        "客户表扬销售经理响应及时，方案专业。",
    ),
}

_SLOTS: dict[str, Callable[[random.Random], str]] = {
    "room": lambda r: f"{r.randint(2, 28)}{r.randint(1, 36):02d}",
    "time": lambda r: f"{r.randint(5, 23):02d}:{r.choice((0, 15, 30, 45)):02d}",
    "hour": lambda r: str(r.randint(12, 18)),
    "mins": lambda r: str(r.randint(10, 60)),
    "n": lambda r: str(r.randint(2, 12)),
    "dish": lambda r: r.choice(_DISHES),
    "day": lambda r: r.choice(_DAYS),
    "month": lambda r: str(r.randint(1, 12)),
}


def _compile_templates() -> dict[tuple[str, str], tuple[tuple[str, tuple[str, ...]], ...]]:
    fmt = string.Formatter()
    return {
        key: tuple((t, tuple(f for _, f, _, _ in fmt.parse(t) if f)) for t in templates)
        for key, templates in _TEMPLATES.items()
    }


_COMPILED = _compile_templates()


def _render(rng: random.Random, department: str, category: str) -> str:
    text, fields = rng.choice(_COMPILED[(department, category)])
    if not fields:
        return text
    return text.format(**{f: _SLOTS[f](rng) for f in fields})


def _cum(weights: Sequence[int]) -> list[int]:
    out, total = [], 0
    for w in weights:
        total += w
        out.append(total)
    return out


def _pick(rng: random.Random, items: Sequence[Any], cum: Sequence[int]) -> Any:
    return items[bisect.bisect_right(cum, rng.random() * cum[-1])]


# --------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------

_HOUR = 3600.0
_DAY = 86400.0
_THREE_YEARS = 3 * 365 * _DAY


def _normalise_now(now: datetime | None) -> datetime:
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)  # naive means UTC: the loader's convention
    return now.astimezone(UTC).replace(microsecond=0)


def _seconds_ago(rng: random.Random) -> float:
    """How long before `now` a CS record was written.

    80% spread over three years; the rest in a dense recent band (7 days,
    24 hours, 2 hours) so "today", "current shift" and "last 72 hours"
    always have plenty of rows, including in the last hour.
    """
    u = rng.random()
    if u < 0.80:
        return rng.random() * _THREE_YEARS
    if u < 0.93:
        return rng.random() * 7 * _DAY
    if u < 0.98:
        return rng.random() * _DAY
    return rng.random() * 2 * _HOUR


def _month_start(d: datetime | date) -> date:
    return date(d.year, d.month, 1)


def _add_months(d: date, months: int) -> date:
    y, m = divmod(d.year * 12 + (d.month - 1) + months, 12)
    return date(y, m + 1, 1)


def partition_bounds(now: datetime | None = None) -> list[tuple[str, date, date]]:
    """Monthly cs_records partitions: (name, from, to) from 3 years ago to next month.

    Bounds are UTC month starts; the month after `now` exists so rows written
    by tests and demos after loading still have a home.
    """
    now = _normalise_now(now)
    first = _month_start(now - timedelta(seconds=_THREE_YEARS))
    first = min(first, _add_months(_month_start(now), -36))
    last = _add_months(_month_start(now), 1)
    out = []
    month = first
    while month <= last:
        nxt = _add_months(month, 1)
        out.append((f"cs_records_{month.year:04d}_{month.month:02d}", month, nxt))
        month = nxt
    return out


def partitions_ddl(now: datetime | None = None) -> str:
    """CREATE TABLE ... PARTITION OF statements for :func:`partition_bounds`."""
    return "\n".join(
        f"CREATE TABLE {name} PARTITION OF cs_records "
        f"FOR VALUES FROM ('{lo.isoformat()} 00:00:00+00') TO ('{hi.isoformat()} 00:00:00+00');"
        for name, lo, hi in partition_bounds(now)
    )


# --------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------


@dataclass
class Table:
    """One table's worth of rows; ``rows`` may be a one-shot iterator."""

    name: str
    columns: tuple[str, ...]
    rows: Iterable[tuple[Any, ...]]


@dataclass
class _CsSummary:
    """What dependent tables need to know about the streamed cs_records."""

    total: int = 0
    complaints: list[tuple[int, str, datetime, bool]] = field(default_factory=list)  # id, dept, at, legal_hold
    sampled: list[tuple[int, str, datetime]] = field(default_factory=list)  # for abnormal tickets
    done: bool = False


def _rng(seed: int, table: str) -> random.Random:
    return random.Random(f"pgwarden-sample:{seed}:{table}")


def _gen_guests(rng: random.Random, count: int) -> list[tuple[Any, ...]]:
    s_cum = _cum([w for _, _, w in _SURNAMES])
    seen_ids: set[str] = set()
    seen_phones: set[str] = set()
    d_lo, d_hi = date(1950, 1, 1).toordinal(), date(2005, 12, 31).toordinal()
    rows = []
    for gid in range(1, count + 1):
        surname, s_py, _ = _pick(rng, _SURNAMES, s_cum)
        given = [rng.choice(_GIVEN) for _ in range(1 if rng.random() < 0.35 else 2)]
        name = surname + "".join(c for c, _ in given)
        while True:
            born = date.fromordinal(rng.randint(d_lo, d_hi))
            first17 = f"{rng.choice(_REGION_CODES)}{born:%Y%m%d}{rng.randint(1, 999):03d}"
            id_number = first17 + resident_id_check_digit(first17)
            if id_number not in seen_ids:
                seen_ids.add(id_number)
                break
        while True:
            phone = rng.choice(_MOBILE_PREFIXES) + f"{rng.randrange(10**8):08d}"
            if phone not in seen_phones:
                seen_phones.add(phone)
                break
        if rng.random() < 0.25:
            email = f"{rng.randint(10**7, 10**10)}@qq.com"
        else:
            handle = s_py + "".join(p for _, p in given)
            if rng.random() < 0.5:
                handle += str(rng.choice((born.year % 100, born.year, rng.randint(1, 999))))
            email = f"{handle}@{rng.choice(_MAIL_DOMAINS)}"
        bank_card = None
        if rng.random() < 0.9:
            bin_, length = rng.choice(_CARD_BINS)
            body = bin_ + "".join(rng.choice(string.digits) for _ in range(length - len(bin_) - 1))
            bank_card = body + luhn_check_digit(body)
        rows.append((
            gid, name, id_number, phone, email, bank_card,
            rng.choice(ACCOUNT_MANAGERS), rng.choice(REGIONS),
            rng.random() < 0.15, rng.random() < 0.6,
        ))
    return rows


_CS_COLUMNS = ("id", "guest_id", "department", "category", "severity", "channel", "agent",
               "guest_name", "phone", "id_number", "bank_card", "content", "legal_hold", "created_at")


def _gen_cs_records(rng: random.Random, count: int, guests: list[tuple[Any, ...]], now: datetime,
                    summary: _CsSummary) -> Iterator[tuple[Any, ...]]:
    # Timestamps first, sorted, so ids grow with time like a real sequence.
    ago = sorted((_seconds_ago(rng) for _ in range(count)), reverse=True)
    dept_cum = _cum(_DEPT_WEIGHTS)
    cat_cum = {d: _cum(w) for d, w in _CATEGORY_WEIGHTS.items()}
    chan_cum = {d: _cum(w) for d, w in _CHANNEL_WEIGHTS.items()}
    n_guests = len(guests)
    rand = rng.random
    for i, seconds in enumerate(ago):
        rid = i + 1
        created_at = now - timedelta(seconds=int(seconds) + 1)
        dept = DEPARTMENTS[bisect.bisect_right(dept_cum, rand() * dept_cum[-1])]
        cat = _pick(rng, CATEGORIES, cat_cum[dept])
        g = guests[int(rand() * n_guests)]
        complaint = cat == "complaint"
        severity = "major" if complaint and rand() < 0.2 else "normal"
        legal_hold = rand() < (0.03 if complaint else 0.003)
        bank_card = g[5] if g[5] is not None and rand() < 0.05 else None
        row = (
            rid, g[0], dept, cat, severity, _pick(rng, CHANNELS, chan_cum[dept]),
            rng.choice(STAFF[dept]), g[1], g[3], g[2], bank_card,
            _render(rng, dept, cat), legal_hold, created_at,
        )
        if complaint or legal_hold:
            summary.complaints.append((rid, dept, created_at, legal_hold))
        if rand() < 0.02:
            summary.sampled.append((rid, dept, created_at))
        summary.total += 1
        yield row
    summary.done = True


_PLANS = (
    "向客人致歉并赠送{x}，由{dept}主管跟进回访。",
    "减免当晚房费{pct}%，三日内电话回访客人满意度。",
    "更换责任员工并开展专项培训，一周内复盘。",
    "升级房型并赠送行政酒廊权益，主管当面致歉。",
    "联系工程部彻底检修设备，形成整改报告。",
)
_GIFTS = ("果盘", "双人早餐", "下午茶券", "延迟退房", "代金券200元")
_DEPT_CN = {"FO": "前厅部", "HK": "客房部", "FB": "餐饮部", "ENG": "工程部", "SALES": "销售部"}


def _gen_complaint_plans(rng: random.Random, summary: _CsSummary, now: datetime) -> Iterator[tuple[Any, ...]]:
    pid = 0
    for rid, dept, at, _hold in summary.complaints:
        if rng.random() >= 0.3:
            continue
        pid += 1
        plan = rng.choice(_PLANS).format(x=rng.choice(_GIFTS), dept=_DEPT_CN[dept], pct=rng.choice((20, 30, 50)))
        created = min(now, at + timedelta(hours=rng.uniform(1, 48)))
        yield (pid, rid, dept, plan, rng.random() < 0.6, created)


def _gen_disputes(rng: random.Random, summary: _CsSummary, now: datetime) -> Iterator[tuple[Any, ...]]:
    """Every legal-hold record is disputed; 30% are handled by another department."""
    did = 0
    for rid, dept, at, hold in summary.complaints:
        if not hold and rng.random() >= 0.01:
            continue
        did += 1
        handling = dept if rng.random() < 0.7 else rng.choice([d for d in DEPARTMENTS if d != dept])
        status = "open" if hold and rng.random() < 0.8 else "closed"
        opened = min(now, at + timedelta(days=rng.uniform(0.1, 10)))
        yield (did, rid, handling, status, opened)


def _gen_service_ratings(rng: random.Random, count: int, now: datetime) -> Iterator[tuple[Any, ...]]:
    dept_cum = _cum(_DEPT_WEIGHTS)
    score_cum = _cum((5, 7, 13, 30, 45))
    for i in range(1, count + 1):
        dept = _pick(rng, DEPARTMENTS, dept_cum)
        yield (i, dept, rng.choice(STAFF[dept]), _pick(rng, (1, 2, 3, 4, 5), score_cum),
               now - timedelta(seconds=int(_seconds_ago(rng)) + 1))


_ABNORMAL_KINDS = ("超时未回访", "重复投诉", "升级处理", "系统异常", "信息登记错误", "客人信息不全")


def _gen_abnormal_tickets(rng: random.Random, summary: _CsSummary, now: datetime) -> Iterator[tuple[Any, ...]]:
    for i, (rid, dept, at) in enumerate(summary.sampled, 1):
        closed = None
        if not (now - at < timedelta(days=3) and rng.random() < 0.7) and rng.random() < 0.9:
            closed = min(now, at + timedelta(hours=rng.uniform(0.5, 72)))
        yield (i, rid, dept, rng.choice(_ABNORMAL_KINDS), at, closed)


_CRISES = (
    ("疑似食物中毒事件", "{n}名客人在自助晚餐后出现腹泻症状，已送医并封存留样，卫生监督部门已介入。"),
    ("电梯困人事件", "{n}号客梯故障停运，{n}名客人被困约{m}分钟，消防救援后安全脱困。"),
    ("火警误报引发恐慌", "凌晨烟感误报触发全楼广播，部分客人疏散时受轻伤，已安排慰问。"),
    ("客人隐私泄露投诉", "客人投诉入住信息被第三方获取，已启动信息安全应急预案并报告总经理。"),
    ("网络舆情事件", "客人在社交媒体发布卫生问题视频，阅读量超{n}万，公关部已介入。"),
    ("停电事故", "市政线路故障导致停电{m}分钟，备用发电机启动延迟，已复盘。"),
    ("泳池溺水险情", "一名儿童在泳池呛水，救生员及时救起，已复查泳池安全管理。"),
)


def _gen_crisis_reports(rng: random.Random, now: datetime) -> Iterator[tuple[Any, ...]]:
    for i in range(1, 16):
        title, body = rng.choice(_CRISES)
        yield (i, title, body.format(n=rng.randint(2, 9), m=rng.randint(15, 90)),
               now - timedelta(days=rng.uniform(0, 3 * 365)))


_SYS_PARAMS = (
    ("pms.endpoint", "https://pms.internal.example:8443/api/v2"),
    ("pms.sync_interval_seconds", "60"),
    ("cs.shift.morning", "07:00-15:00"),
    ("cs.shift.evening", "15:00-23:00"),
    ("cs.shift.night", "23:00-07:00"),
    ("cs.timezone", "Asia/Shanghai"),
    ("cs.retention.ordinary_days", "183"),
    ("cs.retention.major_days", "730"),
    ("ai.bot.enabled", "true"),
    ("ai.bot.model", "kf-assistant-3"),
    ("callcenter.max_queue", "25"),
    ("doorlock.vendor", "VingCard"),
    ("doorlock.retention_days", "90"),
    ("mail.smtp_host", "smtp.internal.example"),
    ("backup.schedule", "0 3 * * *"),
)


def _gen_sys_params(rng: random.Random, now: datetime) -> Iterator[tuple[Any, ...]]:
    for name, value in _SYS_PARAMS:
        yield (name, value, now - timedelta(days=rng.uniform(0, 400)))


_FAULTS = (
    ("pms-gateway", "与PMS接口同步超时（{ms}ms），已自动重试"),
    ("pms-gateway", "PMS返回HTTP 502，订单同步中断"),
    ("ai-bot", "智能客服模型响应超时，已切换人工坐席"),
    ("callcenter", "呼叫中心SIP中继注册失败，线路{n}不可用"),
    ("doorlock", "门锁系统编码器{n}号离线"),
    ("wifi", "客房区无线AP {n} 掉线，已重启"),
    ("db", "数据库连接池耗尽，等待连接超过{ms}ms"),
    ("payment", "银联POS终端{n}签到失败"),
)


def _gen_fault_logs(rng: random.Random, now: datetime) -> Iterator[tuple[Any, ...]]:
    for i in range(1, 401):
        comp, msg = rng.choice(_FAULTS)
        yield (i, comp, msg.format(ms=rng.randint(3000, 30000), n=rng.randint(1, 40)),
               now - timedelta(seconds=rng.uniform(0, 365 * _DAY)))


_SCENARIOS = (
    ("入住办理", ("您好，我预订了今晚的房间。", "您好，欢迎光临！请出示您的证件，我为您办理入住。",
                  "好的，给你。", "已为您办理好，房间在12楼，早餐在二楼，祝您入住愉快。")),
    ("噪音投诉", ("隔壁太吵了，我睡不着。", "非常抱歉给您带来困扰，我马上联系安保人员前往处理。",
                  "能不能给我换个房间？", "可以的，我为您安排一间安静的高楼层房间，行李员马上过来帮您。")),
    ("退房账单疑问", ("账单上这笔迷你吧消费我没用过。", "抱歉，我马上请客房部核查。",
                      "好的，我赶飞机。", "核查确认是登记错误，已为您取消这笔费用，感谢您的耐心。")),
    ("餐饮过敏咨询", ("我对花生过敏，这道菜能吃吗？", "感谢您告知，我向厨师确认一下配料。",
                      "谢谢。", "这道菜含花生油，推荐您选择清蒸鲈鱼，已备注厨房。")),
    ("遗失物品", ("我的耳机落在房间里了。", "请问您的房间号和退房时间？",
                  "1208，今天上午退的。", "已在房间找到，我们可以为您快递寄出。")),
)


def _gen_training_dialogs(rng: random.Random, now: datetime) -> Iterator[tuple[Any, ...]]:
    for i in range(1, 151):
        scenario, lines = rng.choice(_SCENARIOS)
        transcript = "\n".join(("客人：" if k % 2 == 0 else "员工：") + line for k, line in enumerate(lines))
        yield (i, scenario, transcript, now - timedelta(days=rng.uniform(0, 700)))


_DOORS = ("客房门", "客房门", "客房门", "电梯", "健身房", "泳池", "行政酒廊", "停车场")


def _gen_keycard_events(rng: random.Random, count: int, n_guests: int, now: datetime) -> Iterator[tuple[Any, ...]]:
    """Door-lock events over the last 180 days, so a 90-day retention has work to do."""
    for i in range(1, count + 1):
        ago = rng.random() * 180 * _DAY if rng.random() < 0.7 else rng.random() * 7 * _DAY
        yield (i, rng.randint(1, n_guests), f"{rng.randint(2, 28)}{rng.randint(1, 36):02d}",
               rng.choice(_DOORS), f"{rng.getrandbits(32):08X}", now - timedelta(seconds=int(ago) + 1))


def iter_tables(*, cs_records: int = 200_000, guests: int = 5_000, seed: int = 42,
                now: datetime | None = None) -> Iterator[Table]:
    """Yield every sample table in load order, rows generated lazily.

    Tables after ``cs_records`` are derived from it (complaint plans, disputes,
    abnormal tickets), so consume each table's rows before asking for the next.
    """
    if guests < 1:
        raise ValueError("need at least one guest")
    now = _normalise_now(now)
    guest_rows = _gen_guests(_rng(seed, "guests"), guests)
    yield Table("guests", ("id", "name", "id_number", "phone", "email", "bank_card",
                           "account_manager", "region", "vip", "keycard_consent"), guest_rows)
    summary = _CsSummary()
    yield Table("cs_records", _CS_COLUMNS,
                _gen_cs_records(_rng(seed, "cs_records"), cs_records, guest_rows, now, summary))
    if not summary.done:
        raise RuntimeError("consume the cs_records rows before asking for the next table")
    yield Table("complaint_plans", ("id", "cs_record_id", "department", "plan", "published", "created_at"),
                _gen_complaint_plans(_rng(seed, "complaint_plans"), summary, now))
    yield Table("disputes", ("id", "cs_record_id", "handling_department", "status", "opened_at"),
                _gen_disputes(_rng(seed, "disputes"), summary, now))
    yield Table("service_ratings", ("id", "department", "agent", "score", "rated_at"),
                _gen_service_ratings(_rng(seed, "service_ratings"), max(1, cs_records // 10), now))
    yield Table("abnormal_tickets", ("id", "cs_record_id", "department", "kind", "opened_at", "closed_at"),
                _gen_abnormal_tickets(_rng(seed, "abnormal_tickets"), summary, now))
    yield Table("crisis_reports", ("id", "title", "body", "created_at"),
                _gen_crisis_reports(_rng(seed, "crisis_reports"), now))
    yield Table("sys_params", ("name", "value", "updated_at"), _gen_sys_params(_rng(seed, "sys_params"), now))
    yield Table("fault_logs", ("id", "component", "message", "created_at"),
                _gen_fault_logs(_rng(seed, "fault_logs"), now))
    yield Table("training_dialogs", ("id", "scenario", "transcript", "created_at"),
                _gen_training_dialogs(_rng(seed, "training_dialogs"), now))
    yield Table("keycard_events", ("id", "guest_id", "room", "door", "card_serial", "event_at"),
                _gen_keycard_events(_rng(seed, "keycard_events"), guests * 4, guests, now))


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def schema_sql() -> str:
    """The sample schema DDL (``proxy/demo/schema.sql``, shipped as package data)."""
    return importlib.resources.files("proxy.demo").joinpath("schema.sql").read_text(encoding="utf-8")


def _schema_parts() -> tuple[str, str]:
    sql = schema_sql()
    pre, marker, post = sql.partition(POST_LOAD_MARKER)
    if not marker:
        raise RuntimeError(f"schema.sql lacks the {POST_LOAD_MARKER!r} marker")
    return pre, post


_GRANT_SQL = """
DO $grant$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = {role_lit}) THEN
        GRANT USAGE ON SCHEMA public TO {role_ident};
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role_ident};
        GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role_ident};
    END IF;
END
$grant$;
"""


async def load_sample(dsn: str, *, cs_records: int = 200_000, guests: int = 5_000, seed: int = 42,
                      now: datetime | None = None, grant_to: str | None = "pgwarden_svc") -> dict[str, int]:
    """(Re)create the hotel sample in ``dsn`` and return row counts per table.

    Connect as the superuser (or the intended owner): tables end up owned by
    the connecting role, and ``grant_to`` (the proxy's service login, if it
    exists) gets DML rights on them. Everything runs in one transaction, so a
    failed load leaves the previous sample untouched.
    """
    import asyncpg  # local import: generation and unit tests need no driver

    now = _normalise_now(now)
    pre, post = _schema_parts()
    conn = await asyncpg.connect(dsn)
    counts: dict[str, int] = {}
    try:
        async with conn.transaction():
            await conn.execute(pre)
            await conn.execute(partitions_ddl(now))
            for table in iter_tables(cs_records=cs_records, guests=guests, seed=seed, now=now):
                status = await conn.copy_records_to_table(
                    table.name, records=table.rows, columns=list(table.columns), schema_name="public")
                counts[table.name] = int(status.split()[-1])
            await conn.execute(post)
            # COPY with explicit ids does not advance the id sequences.
            await conn.execute("\n".join(
                f"SELECT setval(pg_get_serial_sequence('public.{t}', 'id'), "
                f"coalesce((SELECT max(id) FROM public.{t}), 1), "
                f"(SELECT max(id) IS NOT NULL FROM public.{t}));"
                for t in TABLES if t != "sys_params"))
            if grant_to:
                await conn.execute(_GRANT_SQL.format(role_lit=_literal(grant_to), role_ident=_ident(grant_to)))
            await conn.execute("ANALYZE " + ", ".join(f"public.{t}" for t in TABLES))
    finally:
        await conn.close()
    return counts


def load_sample_sync(dsn: str, **kw: Any) -> dict[str, int]:
    """:func:`load_sample` for synchronous callers (CLI, session fixtures).

    Works even when an event loop is already running in this thread (e.g.
    from an async fixture) by running the load in a worker thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(load_sample(dsn, **kw))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, load_sample(dsn, **kw)).result()


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'
