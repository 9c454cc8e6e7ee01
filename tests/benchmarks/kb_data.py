"""The retrieval benchmark's set: a small shop FAQ and blender manual in English and Korean,
and questions worded unlike the passages, each labelled with the heading that answers it."""

from __future__ import annotations

EN_FAQ = """# Shop help

## Returns
You can send back any item within 30 days of delivery for a full refund. Start from the order
page and print the prepaid label.

## Refund timing
Once the parcel reaches our warehouse, the money goes back to your card within 5 business days.

## Shipping times
Orders leave the warehouse the next working day and usually arrive in 2 to 4 days.

## Shipping costs
Delivery is free for orders over $50; below that a flat fee of $4.99 applies.

## Changing an order
An order can be edited or cancelled until it is packed, usually within one hour of purchase.

## Payment methods
We accept Visa, Mastercard, PayPal and bank transfer. Cash on delivery is not available.

## Gift cards
Gift cards never expire and can be used for any product, including sale items.
"""

EN_MANUAL = """# Blender manual

## First use
Wash the glass jug and the lid in warm soapy water before blending for the first time.

## Speed settings
Turn the dial to 1 for soft fruit, 3 for ice, and use the pulse button for short bursts.

## Cleaning the blades
Fill the jug halfway with warm water and a drop of dish soap, then run speed 2 for 30 seconds.

## Overheating protection
If the motor gets too hot, it stops automatically; unplug it and let it cool for 20 minutes.

## Warranty
The motor is covered for two years from the date of purchase; keep your receipt.
"""

KO_FAQ = """# 고객센터 안내

## 반품
상품을 받은 날로부터 7일 이내에 마이페이지에서 반품을 신청할 수 있습니다.

## 환불 기간
반품 상품이 물류센터에 도착하면 3영업일 이내에 결제 수단으로 환불됩니다.

## 배송 기간
주문 후 2~3일 이내에 배송되며, 제주도와 도서산간 지역은 1~2일이 더 걸립니다.

## 배송비
5만 원 이상 주문하면 무료로 배송되고, 그 미만은 배송비 3,000원이 부과됩니다.

## 주문 취소
상품이 포장되기 전까지는 주문을 취소하거나 변경할 수 있습니다.

## 결제 수단
신용카드, 카카오페이, 네이버페이, 무통장 입금으로 결제할 수 있습니다.

## 적립금
구매 금액의 1%가 적립금으로 쌓이며, 적립금은 1년 동안 사용할 수 있습니다.
"""

KO_MANUAL = """# 블렌더 사용 설명서

## 처음 사용할 때
처음 사용하기 전에 유리 용기와 뚜껑을 따뜻한 비눗물로 세척하세요.

## 속도 조절
부드러운 과일은 1단, 얼음은 3단으로 갈고, 짧게 갈 때는 펄스 버튼을 누르세요.

## 칼날 세척
용기에 따뜻한 물을 절반 정도 붓고 주방 세제를 한 방울 넣은 뒤 2단으로 30초 동안 돌리세요.

## 과열 방지
모터가 과열되면 자동으로 멈춥니다. 전원 코드를 뽑고 20분 동안 식히세요.

## 품질 보증
모터는 구입일로부터 2년 동안 무상으로 보증됩니다. 영수증을 보관하세요.
"""

DOCUMENTS = {
    "en_faq.md": EN_FAQ,
    "en_manual.md": EN_MANUAL,
    "ko_faq.md": KO_FAQ,
    "ko_manual.md": KO_MANUAL,
}

# (question, heading of the passage that answers it)
QUESTIONS = [
    ("How do I return something I bought?", "Returns"),
    ("When will I get my money back?", "Refund timing"),
    ("How long does delivery take?", "Shipping times"),
    ("Do I have to pay for shipping?", "Shipping costs"),
    ("Can I cancel my order?", "Changing an order"),
    ("Can I pay with PayPal?", "Payment methods"),
    ("Do gift cards expire?", "Gift cards"),
    ("What should I do before using the blender the first time?", "First use"),
    ("Which speed should I use to crush ice?", "Speed settings"),
    ("How do I clean the blades?", "Cleaning the blades"),
    ("The blender stopped suddenly while running, why?", "Overheating protection"),
    ("How long is the motor warranty?", "Warranty"),
    ("반품은 어떻게 신청하나요?", "반품"),
    ("환불은 언제 되나요?", "환불 기간"),
    ("배송은 며칠 걸려요?", "배송 기간"),
    ("배송비가 얼마인가요?", "배송비"),
    ("주문을 취소하고 싶어요", "주문 취소"),
    ("카카오페이로 결제돼요?", "결제 수단"),
    ("적립금은 언제까지 쓸 수 있나요?", "적립금"),
    ("블렌더를 처음 쓰기 전에 뭘 해야 하나요?", "처음 사용할 때"),
    ("얼음을 갈려면 몇 단으로 해야 해요?", "속도 조절"),
    ("칼날은 어떻게 세척하나요?", "칼날 세척"),
    ("블렌더가 갑자기 멈췄어요", "과열 방지"),
    ("모터 보증 기간이 얼마나 되나요?", "품질 보증"),
]
