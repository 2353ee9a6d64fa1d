"""The words and prompt templates of the synthetic world (data only).

Nine real languages in five scripts: for each one the numbers zero to twenty
written as words, the seven days of the week (Monday first), eight colours,
twelve common nouns, the names of all nine languages as they appear in that
language's "translate into X" prompts, and three paraphrase templates for
every task. `synthetic.py` turns these into tasks, a verifier and a
translator; the tests pin a few entries of every language by hand.

Words are listed in a comma-separated string (ASCII ',' only; an entry may
hold spaces, as Turkish 'on bir' or Arabic 'أحد عشر'), aligned with the key
tuples below. Names are in the form the templates need (Russian accusative
after 'на', Turkish bare 'İngilizce', Arabic with the article).
"""

import unicodedata

LANGUAGES = ('en', 'fr', 'es', 'de', 'ru', 'hi', 'ar', 'tr', 'zh')
SCRIPTS = {'en': 'Latin', 'fr': 'Latin', 'es': 'Latin', 'de': 'Latin',
           'ru': 'Cyrillic', 'hi': 'Devanagari', 'ar': 'Arabic',
           'tr': 'Latin', 'zh': 'Han'}
DAY_KEYS = ('mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun')
COLOUR_KEYS = ('red', 'blue', 'green', 'yellow', 'black', 'white', 'orange',
               'brown')
NOUN_KEYS = ('dog', 'cat', 'bird', 'fish', 'horse', 'house', 'book', 'tree',
             'apple', 'car', 'bread', 'flower')
# The separator of a written list, per language (default ', ').
LIST_SEPARATORS = {'ar': '، ', 'zh': '、'}

_RAW = {
    'en': dict(
        numbers='zero, one, two, three, four, five, six, seven, eight, nine, '
        'ten, eleven, twelve, thirteen, fourteen, fifteen, sixteen, '
        'seventeen, eighteen, nineteen, twenty',
        days='Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday',
        colours='red, blue, green, yellow, black, white, orange, brown',
        nouns='dog, cat, bird, fish, horse, house, book, tree, apple, car, '
        'bread, flower',
        names='English, French, Spanish, German, Russian, Hindi, Arabic, '
        'Turkish, Chinese'),
    'fr': dict(
        numbers='zéro, un, deux, trois, quatre, cinq, six, sept, huit, neuf, '
        'dix, onze, douze, treize, quatorze, quinze, seize, dix-sept, '
        'dix-huit, dix-neuf, vingt',
        days='lundi, mardi, mercredi, jeudi, vendredi, samedi, dimanche',
        colours='rouge, bleu, vert, jaune, noir, blanc, orange, marron',
        nouns='chien, chat, oiseau, poisson, cheval, maison, livre, arbre, '
        'pomme, voiture, pain, fleur',
        names='anglais, français, espagnol, allemand, russe, hindi, arabe, '
        'turc, chinois'),
    'es': dict(
        numbers='cero, uno, dos, tres, cuatro, cinco, seis, siete, ocho, '
        'nueve, diez, once, doce, trece, catorce, quince, dieciséis, '
        'diecisiete, dieciocho, diecinueve, veinte',
        days='lunes, martes, miércoles, jueves, viernes, sábado, domingo',
        colours='rojo, azul, verde, amarillo, negro, blanco, naranja, marrón',
        nouns='perro, gato, pájaro, pez, caballo, casa, libro, árbol, '
        'manzana, coche, pan, flor',
        names='inglés, francés, español, alemán, ruso, hindi, árabe, turco, '
        'chino'),
    'de': dict(
        numbers='null, eins, zwei, drei, vier, fünf, sechs, sieben, acht, '
        'neun, zehn, elf, zwölf, dreizehn, vierzehn, fünfzehn, sechzehn, '
        'siebzehn, achtzehn, neunzehn, zwanzig',
        days='Montag, Dienstag, Mittwoch, Donnerstag, Freitag, Samstag, '
        'Sonntag',
        colours='rot, blau, grün, gelb, schwarz, weiß, orange, braun',
        nouns='Hund, Katze, Vogel, Fisch, Pferd, Haus, Buch, Baum, Apfel, '
        'Auto, Brot, Blume',
        names='Englisch, Französisch, Spanisch, Deutsch, Russisch, Hindi, '
        'Arabisch, Türkisch, Chinesisch'),
    'ru': dict(
        numbers='ноль, один, два, три, четыре, пять, шесть, семь, восемь, '
        'девять, десять, одиннадцать, двенадцать, тринадцать, четырнадцать, '
        'пятнадцать, шестнадцать, семнадцать, восемнадцать, девятнадцать, '
        'двадцать',
        days='понедельник, вторник, среда, четверг, пятница, суббота, '
        'воскресенье',
        colours='красный, синий, зелёный, жёлтый, чёрный, белый, оранжевый, '
        'коричневый',
        nouns='собака, кошка, птица, рыба, лошадь, дом, книга, дерево, '
        'яблоко, машина, хлеб, цветок',
        names='английский, французский, испанский, немецкий, русский, хинди, '
        'арабский, турецкий, китайский'),
    'hi': dict(
        numbers='शून्य, एक, दो, तीन, चार, पाँच, छह, सात, आठ, नौ, दस, ग्यारह, '
        'बारह, तेरह, चौदह, पंद्रह, सोलह, सत्रह, अठारह, उन्नीस, बीस',
        days='सोमवार, मंगलवार, बुधवार, गुरुवार, शुक्रवार, शनिवार, रविवार',
        colours='लाल, नीला, हरा, पीला, काला, सफ़ेद, नारंगी, भूरा',
        nouns='कुत्ता, बिल्ली, पक्षी, मछली, घोड़ा, घर, किताब, पेड़, सेब, '
        'गाड़ी, रोटी, फूल',
        names='अंग्रेज़ी, फ़्रेंच, स्पेनिश, जर्मन, रूसी, हिंदी, अरबी, तुर्की, '
        'चीनी'),
    'ar': dict(
        numbers='صفر, واحد, اثنان, ثلاثة, أربعة, خمسة, ستة, سبعة, ثمانية, '
        'تسعة, عشرة, أحد عشر, اثنا عشر, ثلاثة عشر, أربعة عشر, خمسة عشر, '
        'ستة عشر, سبعة عشر, ثمانية عشر, تسعة عشر, عشرون',
        days='الاثنين, الثلاثاء, الأربعاء, الخميس, الجمعة, السبت, الأحد',
        colours='أحمر, أزرق, أخضر, أصفر, أسود, أبيض, برتقالي, بني',
        nouns='كلب, قطة, طائر, سمكة, حصان, بيت, كتاب, شجرة, تفاحة, سيارة, '
        'خبز, زهرة',
        names='الإنجليزية, الفرنسية, الإسبانية, الألمانية, الروسية, الهندية, '
        'العربية, التركية, الصينية'),
    'tr': dict(
        numbers='sıfır, bir, iki, üç, dört, beş, altı, yedi, sekiz, dokuz, '
        'on, on bir, on iki, on üç, on dört, on beş, on altı, on yedi, '
        'on sekiz, on dokuz, yirmi',
        days='Pazartesi, Salı, Çarşamba, Perşembe, Cuma, Cumartesi, Pazar',
        colours='kırmızı, mavi, yeşil, sarı, siyah, beyaz, turuncu, '
        'kahverengi',
        nouns='köpek, kedi, kuş, balık, at, ev, kitap, ağaç, elma, araba, '
        'ekmek, çiçek',
        names='İngilizce, Fransızca, İspanyolca, Almanca, Rusça, Hintçe, '
        'Arapça, Türkçe, Çince'),
    'zh': dict(
        numbers='零, 一, 二, 三, 四, 五, 六, 七, 八, 九, 十, 十一, 十二, 十三, '
        '十四, 十五, 十六, 十七, 十八, 十九, 二十',
        days='星期一, 星期二, 星期三, 星期四, 星期五, 星期六, 星期日',
        colours='红色, 蓝色, 绿色, 黄色, 黑色, 白色, 橙色, 棕色',
        nouns='狗, 猫, 鸟, 鱼, 马, 房子, 书, 树, 苹果, 汽车, 面包, 花',
        names='英语, 法语, 西班牙语, 德语, 俄语, 印地语, 阿拉伯语, 土耳其语, '
        '中文'),
}

# Placeholders: {a} {b} number words; {day}; {items} a written list of
# nouns/colours; {nums} a written list of number words; {word} {lang}.
_TEMPLATES = {
    'en': dict(
        add=('What is {a} plus {b}?', 'Add {a} and {b}. Answer in words.',
             'How much is {a} plus {b}?'),
        sub=('What is {a} minus {b}?',
             'Subtract {b} from {a}. Answer in words.',
             'How much is {a} minus {b}?'),
        next_day=('What day comes after {day}?',
                  'Today is {day}. What day is it tomorrow?',
                  'Which day of the week follows {day}?'),
        prev_day=('What day comes before {day}?',
                  'Today is {day}. What day was it yesterday?',
                  'Which day of the week comes just before {day}?'),
        count=('How many items are in this list: {items}?',
               'Count the words in this list: {items}. Answer in words.',
               '{items}. How many words is that?'),
        sort=('Sort these numbers from smallest to largest: {nums}.',
              'Put these numbers in ascending order: {nums}.',
              'Order from lowest to highest: {nums}.'),
        translate=('Translate the word "{word}" into {lang}.',
                   'What is "{word}" in {lang}?',
                   'How do you say "{word}" in {lang}?'),
        copy=('Repeat this list exactly: {items}.',
              'Copy the following words: {items}.',
              'Write these words again in the same order: {items}.'),
        reverse=('Write this list in reverse order: {items}.',
                 'Reverse the order of these words: {items}.',
                 'List these words from last to first: {items}.')),
    'fr': dict(
        add=('Combien font {a} plus {b} ?',
             'Additionne {a} et {b}. Réponds en lettres.',
             'Quel est le résultat de {a} plus {b} ?'),
        sub=('Combien font {a} moins {b} ?',
             'Soustrais {b} de {a}. Réponds en lettres.',
             'Quel est le résultat de {a} moins {b} ?'),
        next_day=('Quel jour vient après {day} ?',
                  "Aujourd'hui, c'est {day}. Quel jour serons-nous demain ?",
                  'Quel jour de la semaine suit {day} ?'),
        prev_day=('Quel jour vient avant {day} ?',
                  "Aujourd'hui, c'est {day}. Quel jour étions-nous hier ?",
                  'Quel jour de la semaine précède {day} ?'),
        count=("Combien d'éléments y a-t-il dans cette liste : {items} ?",
               'Compte les mots de cette liste : {items}. Réponds en lettres.',
               '{items}. Combien de mots cela fait-il ?'),
        sort=('Trie ces nombres du plus petit au plus grand : {nums}.',
              'Range ces nombres par ordre croissant : {nums}.',
              'Classe du plus petit au plus grand : {nums}.'),
        translate=('Traduis le mot « {word} » en {lang}.',
                   'Comment dit-on « {word} » en {lang} ?',
                   'Quelle est la traduction de « {word} » en {lang} ?'),
        copy=('Répète exactement cette liste : {items}.',
              'Recopie les mots suivants : {items}.',
              'Écris de nouveau ces mots dans le même ordre : {items}.'),
        reverse=("Écris cette liste dans l'ordre inverse : {items}.",
                 "Inverse l'ordre de ces mots : {items}.",
                 'Donne ces mots du dernier au premier : {items}.')),
    'es': dict(
        add=('¿Cuánto es {a} más {b}?',
             'Suma {a} y {b}. Responde con palabras.',
             '¿Cuál es el resultado de {a} más {b}?'),
        sub=('¿Cuánto es {a} menos {b}?',
             'Resta {b} de {a}. Responde con palabras.',
             '¿Cuál es el resultado de {a} menos {b}?'),
        next_day=('¿Qué día viene después del {day}?',
                  'Hoy es {day}. ¿Qué día será mañana?',
                  '¿Qué día de la semana sigue al {day}?'),
        prev_day=('¿Qué día viene antes del {day}?',
                  'Hoy es {day}. ¿Qué día fue ayer?',
                  '¿Qué día de la semana va justo antes del {day}?'),
        count=('¿Cuántos elementos hay en esta lista: {items}?',
               'Cuenta las palabras de esta lista: {items}. Responde con '
               'palabras.',
               '{items}. ¿Cuántas palabras son?'),
        sort=('Ordena estos números de menor a mayor: {nums}.',
              'Pon estos números en orden ascendente: {nums}.',
              'Ordena del más pequeño al más grande: {nums}.'),
        translate=('Traduce la palabra «{word}» al {lang}.',
                   '¿Cómo se dice «{word}» en {lang}?',
                   '¿Cuál es la traducción de «{word}» al {lang}?'),
        copy=('Repite exactamente esta lista: {items}.',
              'Copia las siguientes palabras: {items}.',
              'Escribe de nuevo estas palabras en el mismo orden: {items}.'),
        reverse=('Escribe esta lista en orden inverso: {items}.',
                 'Invierte el orden de estas palabras: {items}.',
                 'Enumera estas palabras de la última a la primera: '
                 '{items}.')),
    'de': dict(
        add=('Was ist {a} plus {b}?', 'Addiere {a} und {b}. Antworte in '
             'Worten.', 'Wie viel ergibt {a} plus {b}?'),
        sub=('Was ist {a} minus {b}?',
             'Ziehe {b} von {a} ab. Antworte in Worten.',
             'Wie viel ergibt {a} minus {b}?'),
        next_day=('Welcher Tag kommt nach {day}?',
                  'Heute ist {day}. Welcher Tag ist morgen?',
                  'Welcher Wochentag folgt auf {day}?'),
        prev_day=('Welcher Tag kommt vor {day}?',
                  'Heute ist {day}. Welcher Tag war gestern?',
                  'Welcher Wochentag liegt direkt vor {day}?'),
        count=('Wie viele Elemente hat diese Liste: {items}?',
               'Zähle die Wörter in dieser Liste: {items}. Antworte in '
               'Worten.',
               '{items}. Wie viele Wörter sind das?'),
        sort=('Sortiere diese Zahlen aufsteigend: {nums}.',
              'Ordne diese Zahlen von der kleinsten zur größten: {nums}.',
              'Bringe diese Zahlen in aufsteigende Reihenfolge: {nums}.'),
        translate=('Übersetze das Wort „{word}“ auf {lang}.',
                   'Wie heißt „{word}“ auf {lang}?',
                   'Wie sagt man „{word}“ auf {lang}?'),
        copy=('Wiederhole diese Liste genau: {items}.',
              'Schreibe die folgenden Wörter ab: {items}.',
              'Schreibe diese Wörter noch einmal in derselben Reihenfolge: '
              '{items}.'),
        reverse=('Schreibe diese Liste in umgekehrter Reihenfolge: {items}.',
                 'Kehre die Reihenfolge dieser Wörter um: {items}.',
                 'Nenne diese Wörter vom letzten bis zum ersten: {items}.')),
    'ru': dict(
        add=('Сколько будет {a} плюс {b}?', 'Сложи {a} и {b}. Ответь словами.',
             'Чему равно {a} плюс {b}?'),
        sub=('Сколько будет {a} минус {b}?',
             'Чему равно {a} минус {b}? Ответь словами.',
             'Найди разность: {a} минус {b}.'),
        next_day=('Сегодня {day}. Какой день будет завтра?',
                  'Если сегодня {day}, то какой день недели будет завтра?',
                  'Какой день следует за днём «{day}»?'),
        prev_day=('Сегодня {day}. Какой день был вчера?',
                  'Если сегодня {day}, то какой день недели был вчера?',
                  'Какой день предшествует дню «{day}»?'),
        count=('Сколько элементов в этом списке: {items}?',
               'Посчитай слова в списке: {items}. Ответь словами.',
               '{items}. Сколько здесь слов?'),
        sort=('Упорядочь эти числа по возрастанию: {nums}.',
              'Расставь числа от меньшего к большему: {nums}.',
              'Отсортируй по возрастанию: {nums}.'),
        translate=('Переведи слово «{word}» на {lang}.',
                   'Переведи на {lang} слово «{word}».',
                   'Напиши перевод слова «{word}» на {lang}.'),
        copy=('Повтори этот список в точности: {items}.',
              'Перепиши следующие слова: {items}.',
              'Напиши эти слова ещё раз в том же порядке: {items}.'),
        reverse=('Напиши этот список в обратном порядке: {items}.',
                 'Переставь эти слова в обратном порядке: {items}.',
                 'Перечисли эти слова от последнего к первому: {items}.')),
    'hi': dict(
        add=('{a} और {b} का योग क्या है?',
             '{a} में {b} जोड़ने पर कितना होता है?',
             '{a} धन {b} कितना होता है? शब्दों में उत्तर दें।'),
        sub=('{a} में से {b} घटाने पर कितना बचता है?',
             '{a} ऋण {b} कितना होता है? शब्दों में उत्तर दें।',
             '{a} और {b} का अंतर क्या है?'),
        next_day=('आज {day} है। कल कौन सा दिन होगा?',
                  '{day} के बाद कौन सा दिन आता है?',
                  'सप्ताह में {day} के ठीक बाद कौन सा दिन आता है?'),
        prev_day=('आज {day} है। कल कौन सा दिन था?',
                  '{day} से पहले कौन सा दिन आता है?',
                  'सप्ताह में {day} से ठीक पहले कौन सा दिन आता है?'),
        count=('इस सूची में कितनी चीज़ें हैं: {items}?',
               'इस सूची के शब्द गिनिए: {items}। शब्दों में उत्तर दें।',
               '{items}। ये कितने शब्द हैं?'),
        sort=('इन संख्याओं को छोटी से बड़ी के क्रम में लिखिए: {nums}।',
              'इन संख्याओं को आरोही क्रम में रखिए: {nums}।',
              'सबसे छोटी से सबसे बड़ी तक क्रम से लिखें: {nums}।'),
        translate=('"{word}" शब्द का {lang} में अनुवाद करें।',
                   '{lang} में "{word}" को क्या कहते हैं?',
                   '"{word}" का {lang} अनुवाद क्या है?'),
        copy=('इस सूची को ज्यों का त्यों दोहराइए: {items}।',
              'इन शब्दों की नकल कीजिए: {items}।',
              'इन शब्दों को उसी क्रम में फिर से लिखिए: {items}।'),
        reverse=('इस सूची को उलटे क्रम में लिखिए: {items}।',
                 'इन शब्दों का क्रम उलट दीजिए: {items}।',
                 'इन शब्दों को आख़िरी से पहले तक लिखिए: {items}।')),
    'ar': dict(
        add=('كم يساوي {a} زائد {b}؟', 'اجمع {a} مع {b}. أجب بالكلمات.',
             'ما ناتج {a} زائد {b}؟'),
        sub=('كم يساوي {a} ناقص {b}؟', 'اطرح {b} من {a}. أجب بالكلمات.',
             'ما ناتج {a} ناقص {b}؟'),
        next_day=('ما اليوم الذي يأتي بعد {day}؟',
                  'اليوم {day}. أي يوم سيكون غدا؟',
                  'أي يوم من أيام الأسبوع يلي {day}؟'),
        prev_day=('ما اليوم الذي يأتي قبل {day}؟',
                  'اليوم {day}. أي يوم كان أمس؟',
                  'أي يوم من أيام الأسبوع يسبق {day}؟'),
        count=('كم عدد العناصر في هذه القائمة: {items}؟',
               'احسب عدد الكلمات في هذه القائمة: {items}. أجب بالكلمات.',
               '{items}. كم كلمة هنا؟'),
        sort=('رتب هذه الأعداد من الأصغر إلى الأكبر: {nums}.',
              'ضع هذه الأعداد بترتيب تصاعدي: {nums}.',
              'رتب تصاعديا: {nums}.'),
        translate=('ترجم كلمة «{word}» إلى {lang}.',
                   'ما ترجمة «{word}» إلى {lang}؟',
                   'كيف تقول «{word}» باللغة {lang}؟'),
        copy=('كرر هذه القائمة كما هي: {items}.',
              'انسخ الكلمات التالية: {items}.',
              'اكتب هذه الكلمات مرة أخرى بالترتيب نفسه: {items}.'),
        reverse=('اكتب هذه القائمة بترتيب معكوس: {items}.',
                 'اعكس ترتيب هذه الكلمات: {items}.',
                 'اكتب هذه الكلمات من الأخيرة إلى الأولى: {items}.')),
    'tr': dict(
        add=('{a} artı {b} kaç eder?',
             '{a} ile {b} sayılarını topla. Cevabı yazıyla ver.',
             '{a} artı {b} kaçtır?'),
        sub=('{a} eksi {b} kaç eder?',
             '{a} sayısından {b} sayısını çıkar. Cevabı yazıyla ver.',
             '{a} eksi {b} kaçtır?'),
        next_day=('Bugün {day}. Yarın hangi gün?',
                  '{day} gününden sonra hangi gün gelir?',
                  'Haftanın hangi günü {day} gününden hemen sonra gelir?'),
        prev_day=('Bugün {day}. Dün hangi gündü?',
                  '{day} gününden önce hangi gün gelir?',
                  'Haftanın hangi günü {day} gününden hemen önce gelir?'),
        count=('Bu listede kaç öğe var: {items}?',
               'Bu listedeki kelimeleri say: {items}. Cevabı yazıyla ver.',
               '{items}. Bu kaç kelime eder?'),
        sort=('Bu sayıları küçükten büyüğe sırala: {nums}.',
              'Bu sayıları artan sırada yaz: {nums}.',
              'En küçükten en büyüğe sırala: {nums}.'),
        translate=('"{word}" kelimesinin {lang} karşılığı nedir?',
                   '"{word}" {lang} nasıl söylenir?',
                   '"{word}" kelimesini {lang} olarak yaz.'),
        copy=('Bu listeyi aynen tekrarla: {items}.',
              'Aşağıdaki kelimeleri kopyala: {items}.',
              'Bu kelimeleri aynı sırayla yeniden yaz: {items}.'),
        reverse=('Bu listeyi ters sırayla yaz: {items}.',
                 'Bu kelimelerin sırasını ters çevir: {items}.',
                 'Bu kelimeleri sondan başa doğru yaz: {items}.')),
    'zh': dict(
        add=('{a}加{b}等于多少？', '请计算{a}加{b}，用汉字回答。',
             '{a}加上{b}是多少？'),
        sub=('{a}减{b}等于多少？', '请计算{a}减{b}，用汉字回答。',
             '{a}减去{b}是多少？'),
        next_day=('今天是{day}，明天是星期几？', '{day}的后一天是星期几？',
                  '{day}之后的那一天是星期几？'),
        prev_day=('今天是{day}，昨天是星期几？', '{day}的前一天是星期几？',
                  '{day}之前的那一天是星期几？'),
        count=('这个列表里有几个词：{items}？',
               '数一数这个列表中的词：{items}。用汉字回答。',
               '{items}。一共有几个词？'),
        sort=('把这些数从小到大排列：{nums}。', '请按升序排列这些数：{nums}。',
              '从小到大排序：{nums}。'),
        translate=('把“{word}”翻译成{lang}。', '“{word}”用{lang}怎么说？',
                   '“{word}”的{lang}是什么？'),
        copy=('请原样重复这个列表：{items}。', '抄写下面的词：{items}。',
              '按相同的顺序再写一遍这些词：{items}。'),
        reverse=('请把这个列表倒过来写：{items}。',
                 '把这些词的顺序颠倒过来：{items}。',
                 '从最后一个到第一个写出这些词：{items}。')),
}


def _entries(text: str) -> tuple:
  return tuple(unicodedata.normalize('NFC', w.strip())
               for w in text.split(','))


def _nfc(templates):
  return tuple(unicodedata.normalize('NFC', t) for t in templates)


# LEXICON[lang] = {'numbers': 21 words (0..20), 'days': 7 (Monday first),
#   'colours': 8 (COLOUR_KEYS), 'nouns': 12 (NOUN_KEYS),
#   'names': 9 (LANGUAGES)}; NFC-normalised.
LEXICON = {lang: {cat: _entries(text) for cat, text in raw.items()}
           for lang, raw in _RAW.items()}
# TEMPLATES[lang][task] = paraphrase templates (NFC-normalised).
TEMPLATES = {lang: {task: _nfc(ts) for task, ts in tasks.items()}
             for lang, tasks in _TEMPLATES.items()}
CATEGORY_SIZES = {'numbers': 21, 'days': len(DAY_KEYS),
                  'colours': len(COLOUR_KEYS), 'nouns': len(NOUN_KEYS),
                  'names': len(LANGUAGES)}
