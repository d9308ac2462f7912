FROM extra
COPY a.txt /a.txt
