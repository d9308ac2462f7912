FROM scratch
ADD {{GIT}}/repo.git#v1:sub /s
